"""Decoding JSON from the network: bounded nesting, finite numbers, one typed error.

Everything the platform (or anything pretending to be it) sends goes through
:func:`loads`. It refuses what would hurt the process further down, and says
so with a :class:`~parall_bridge.errors.ProtocolError`:

- nesting deeper than :data:`MAX_DEPTH` (the standard parser recurses, so a
  deep enough body raises ``RecursionError``; and what it does parse at depth
  1,000 still breaks ``repr`` and ``json.dumps`` of the result downstream);
- ``NaN``, ``Infinity`` and ``-Infinity`` (not JSON, though Python's parser
  takes them);
- numbers a double cannot hold: a float that overflows to infinity
  (``1e400``) and an integer above the largest double (~1.8e308), whose
  conversion to float raises ``OverflowError`` later;
- anything else the parser rejects (bad syntax, bad UTF-8, integers longer
  than Python's digit limit).

The depth is checked without recursion and almost always without a scan: a
body with no more opening brackets than the cap cannot nest deeper than it
(two ``count`` calls). A body with more brackets gets the exact check, in C
string operations only: escaped backslashes and quotes removed
(``replace``), every byte but quotes and brackets dropped (``translate``),
the brackets inside strings dropped, then matched pairs peeled off level by
level (``replace``), at most :data:`MAX_DEPTH` passes.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Final

from .errors import ProtocolError

__all__ = ["MAX_DEPTH", "loads", "nesting_depth_exceeds"]

MAX_DEPTH: Final = 64
"""Deepest nesting of arrays and objects accepted. The protocol's objects nest
about 5 levels; 64 leaves room for free-form settings and stays far below
Python's recursion limit (~1,000), which the parser, ``repr`` and
``json.dumps`` all hit on deeper data."""

_STRUCTURE: Final = bytes.maketrans(b"[{]}", b"(())")
_NOT_STRUCTURE: Final = bytes(b for b in range(256) if b not in b'"[]{}')
_MAX_FLOAT: Final = sys.float_info.max


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("a number too large for a double")
    return value


def _bounded_int(text: str) -> int:
    value = int(text)
    if abs(value) > _MAX_FLOAT:
        raise ValueError("an integer too large for a double")
    return value


def _int_or_infinity(text: str) -> int | float:
    value = int(text)
    return value if abs(value) <= _MAX_FLOAT else (math.inf if value > 0 else -math.inf)


_DECODER: Final = json.JSONDecoder(
    parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_bounded_int
)
_LENIENT_DECODER: Final = json.JSONDecoder(parse_int=_int_or_infinity)


def nesting_depth_exceeds(raw: bytes | bytearray | str, max_depth: int) -> bool:
    """Whether the brackets outside strings of ``raw`` nest deeper than ``max_depth``.

    Conservative on malformed input (an unterminated string, unbalanced
    brackets): it may then say "too deep" for text the parser would refuse
    anyway, never "fine" for text the parser would recurse into deeper.
    """
    if isinstance(raw, str):
        openers = raw.count("[") + raw.count("{")
    else:
        openers = raw.count(b"[") + raw.count(b"{")
    if openers <= max_depth:
        return False  # the fast path: not enough brackets to nest that deep
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if b"\\" in data:  # escapes: an escaped backslash or quote must not count as one
        data = data.replace(b"\\\\", b"").replace(b'\\"', b"")
    # Quotes and brackets only; an empty string's quotes (or the quotes between two
    # strings) go first, then what is left inside the remaining strings.
    kept = data.translate(_STRUCTURE, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in kept:
        kept = b"".join(kept.split(b'"')[::2])
    brackets = kept.decode("ascii")
    too_deep = "(" * (max_depth + 1)
    # Each pass removes every innermost pair, so the passes count how deep the matched
    # pairs nest; openers left unmatched (a truncated body) can only add to that.
    passes = 0
    while "()" in brackets:
        if passes == max_depth or too_deep in brackets:
            return True
        brackets = brackets.replace("()", "")
        passes += 1
    return passes + brackets.count("(") > max_depth


def loads(
    raw: bytes | bytearray | str, *, max_depth: int = MAX_DEPTH, allow_nonfinite: bool = False
) -> Any:
    """Decode one JSON document, refusing what :mod:`parall_bridge._json` describes.

    With ``allow_nonfinite``, ``NaN``, ``Infinity`` and numbers a double cannot hold
    are read as the floats ``nan`` and ``inf`` instead (the models refuse them; the
    WebSocket reads frames this way so that one odd number costs a field, not the
    frame: a ``hello`` must get through).

    Raises:
        ProtocolError: the text is not JSON, nests deeper than ``max_depth``,
            or holds a non-finite or oversized number.
    """
    if nesting_depth_exceeds(raw, max_depth):
        raise ProtocolError(f"JSON nested deeper than {max_depth} levels")
    try:
        decoder = _LENIENT_DECODER if allow_nonfinite else _DECODER
        return decoder.decode(raw if isinstance(raw, str) else raw.decode("utf-8-sig"))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, our number checks
        raise ProtocolError(f"not JSON ({_reason(exc)})") from None


def _reason(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} (char {exc.pos})"
    if isinstance(exc, UnicodeDecodeError):
        return "invalid UTF-8"
    return str(exc).split(":")[0][:80]
