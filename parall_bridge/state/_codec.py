"""Events as JSON text for a store: every field kept, datetimes at full precision."""

from __future__ import annotations

import json
from datetime import datetime

import cattrs

from .._serde import parse_datetime
from ..errors import StateStoreError
from ..events import ParallEvent

__all__ = ["decode_event", "encode_event"]

_converter = cattrs.Converter(unstruct_collection_overrides={tuple: list})
_converter.register_unstructure_hook(datetime, datetime.isoformat)
_converter.register_structure_hook(datetime, lambda value, _: parse_datetime(value))


def encode_event(event: ParallEvent) -> str:
    """``event`` as compact JSON text."""
    return json.dumps(_converter.unstructure(event), separators=(",", ":"), ensure_ascii=False)


def decode_event(text: str) -> ParallEvent:
    """The event :func:`encode_event` wrote.

    Raises:
        StateStoreError: the text is not such an event.
    """
    try:
        return _converter.structure(json.loads(text), ParallEvent)
    except (ValueError, TypeError, KeyError, cattrs.BaseValidationError) as exc:
        raise StateStoreError(f"a stored event does not decode: {exc}") from None
