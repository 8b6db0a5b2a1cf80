"""The JSON decoder of everything read from the network: depth cap, finite numbers."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parall_bridge import ProtocolError
from parall_bridge._json import MAX_DEPTH, loads, nesting_depth_exceeds


def nested(depth: int) -> str:
    """JSON nested exactly ``depth`` levels (arrays and objects alternating)."""
    text = "1"
    for level in range(depth):
        text = f'{{"k": {text}}}' if level % 2 else f"[{text}]"
    return text


def reference_depth(text: str) -> int:
    """The deepest bracket outside strings, the slow and obvious way."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def test_the_cap_is_64_levels_inclusive() -> None:
    assert MAX_DEPTH == 64
    assert loads(nested(64)) is not None
    assert loads(nested(64).encode()) is not None
    with pytest.raises(ProtocolError, match="nested deeper than 64 levels"):
        loads(nested(65))


@pytest.mark.parametrize(
    "bomb",
    [
        "[" * 100_000 + "]" * 100_000,
        "[" * 1_000_000,  # truncated: never closed
        '{"a":' * 50_000 + "1" + "}" * 50_000,
        "[[]" * 70_000,  # no long run of openers, still deep
    ],
)
def test_depth_bombs_are_a_protocol_error_not_a_recursion_error(bomb: str) -> None:
    for raw in (bomb, bomb.encode(), bytearray(bomb.encode())):
        with pytest.raises(ProtocolError, match="nested deeper"):
            loads(raw)


def test_brackets_inside_strings_do_not_count() -> None:
    text = json.dumps({"text": "[[[{{{" * 100, "quote": 'a \\" [ " ]' * 50, "b": "\\\\" * 40})
    assert nesting_depth_exceeds(text, 2) is False
    assert loads(text)["text"].startswith("[[[")


@settings(max_examples=300, deadline=None)
@given(
    st.recursive(
        st.none() | st.integers() | st.text(alphabet='[]{}"\\ab'),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(st.text(alphabet='[]{"\\k', max_size=3), children, max_size=3)
        ),
        max_leaves=60,
    ),
    st.integers(1, 12),
)
def test_the_depth_check_agrees_with_a_character_scan(document: Any, cap: int) -> None:
    text = json.dumps(document)
    assert nesting_depth_exceeds(text, cap) == (reference_depth(text) > cap)
    assert nesting_depth_exceeds(text.encode(), cap) == (reference_depth(text) > cap)


@pytest.mark.parametrize(
    "text",
    ["1e400", "-1e400", "NaN", '{"a": Infinity}', "[-Infinity]", "9" * 400, "-" + "9" * 400],
)
def test_numbers_a_double_cannot_hold_are_refused(text: str) -> None:
    with pytest.raises(ProtocolError, match="not JSON"):
        loads(text)


def test_allow_nonfinite_reads_them_as_floats_for_the_models_to_refuse() -> None:
    data = loads("[NaN, Infinity, 1e400, -1e400, 1" + "0" * 400 + "]", allow_nonfinite=True)
    assert math.isnan(data[0])
    assert data[1:] == [math.inf, math.inf, -math.inf, math.inf]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "Expecting value"),
        (b'{"a": 1', "Expecting"),
        (b"\xff\xfe", "invalid UTF-8"),
        (b"1" * 5000, "limit"),
        (b"<html>", "Expecting value"),
    ],
)
def test_anything_else_unreadable_is_one_typed_error(raw: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason):
        loads(raw)


def test_ordinary_documents_decode_as_json_loads_does() -> None:
    doc = {"id": "msg_1", "n": [1, 2.5, -3e10, 1.7976931348623157e308], "t": "é\n", "x": None}
    assert loads(json.dumps(doc)) == doc
    assert loads(b"\xef\xbb\xbf" + json.dumps(doc).encode()) == doc  # a UTF-8 BOM
