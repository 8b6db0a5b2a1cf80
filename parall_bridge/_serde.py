"""The one cattrs converter that (de)serialises every model of the library.

Rules (PROTOCOL.md, "Conventions"): unknown fields are ignored; unknown enum
values are kept as plain strings; datetimes are RFC 3339 strings; absent
optional fields take their defaults; ``None``-valued optional fields are left
out on output.

What the server sends is read strictly, never coerced: a string field takes
only a string (a null, missing or numeric ``id`` is an error, never the id
``'None'``), an integer only an integer (or an integral float), a float only
a finite number, a boolean only a boolean, a list only an array, an object
only an object. A ``null`` on a field that has a default and is not nullable counts
as absent (the default); on a required field it is an error.
"""

from __future__ import annotations

import enum
import math
import types
import typing
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import attrs
import cattrs
from cattrs.cols import homogenous_tuple_structure_factory
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from .models import (
    AgentConfig,
    Attachment,
    MediaContent,
    Message,
    MessageType,
    TextContent,
)

__all__ = ["converter", "format_datetime", "parse_datetime", "structure", "unstructure"]

T = TypeVar("T")


def parse_datetime(value: Any) -> datetime:
    """Parse an RFC 3339 timestamp (``Z`` or an offset, any fraction of a second)."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str):
        raise TypeError(f"expected an RFC 3339 string, got {type(value).__name__}")
    text = value.strip()
    if text.endswith(("z", "Z")):
        text = text[:-1] + "+00:00"
    parsed = datetime.fromisoformat(text)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def format_datetime(value: datetime) -> str:
    """Format a datetime as RFC 3339 in UTC with millisecond precision and a ``Z``."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _enum_of_union(tp: Any) -> type[enum.StrEnum] | None:
    """Return E when ``tp`` is ``E | str`` or ``E | str | None`` for a StrEnum E."""
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return None
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) != 2 or str not in args:
        return None
    other = args[0] if args[1] is str else args[1]
    if isinstance(other, type) and issubclass(other, enum.StrEnum):
        return other
    return None


def _structure_str(value: Any, _: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {_json_type(value)}")
    return value


def _structure_int(value: Any, _: Any) -> int:
    if isinstance(value, float) and value.is_integer():  # never nan or inf
        return int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"expected an integer, got {_json_type(value)}")
    return value


def _structure_float(value: Any, _: Any) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"expected a number, got {_json_type(value)}")
    if not math.isfinite(value):
        raise TypeError("expected a finite number")
    return float(value)


def _structure_bool(value: Any, _: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected a boolean, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type (never the value: it may be private)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _is_homogeneous_tuple(tp: Any) -> bool:
    args = typing.get_args(tp)
    return typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis


def _admits_none(tp: Any) -> bool:
    return tp is Any or tp is None or type(None) in typing.get_args(tp)


def _nulls_as_absent(cls: Any) -> frozenset[str]:
    """The fields of an attrs class where a ``null`` means "use the default": those
    that have one and whose type does not allow ``None``."""
    origin = typing.get_origin(cls) or cls
    hints = typing.get_type_hints(origin)
    return frozenset(
        a.name
        for a in attrs.fields(origin)
        if a.default is not attrs.NOTHING and not _admits_none(hints.get(a.name, Any))
    )


def _without_nulls(data: Any, names: frozenset[str]) -> Any:
    if not isinstance(data, Mapping):
        raise TypeError(f"expected an object, got {_json_type(data)}")
    if names and any(data.get(name, ...) is None for name in names):
        return {k: v for k, v in data.items() if not (v is None and k in names)}
    return data


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(
        forbid_extra_keys=False,
        unstruct_collection_overrides={tuple: list},
    )

    conv.register_structure_hook(str, _structure_str)
    conv.register_structure_hook(int, _structure_int)
    conv.register_structure_hook(float, _structure_float)
    conv.register_structure_hook(bool, _structure_bool)

    def array_factory(tp: Any) -> Callable[[Any, Any], Any]:
        base = homogenous_tuple_structure_factory(tp, conv)

        def structure_array(value: Any, cls: Any) -> Any:
            if not isinstance(value, list | tuple):
                raise TypeError(f"expected an array, got {_json_type(value)}")
            return base(value, cls)

        return structure_array

    conv.register_structure_hook_factory(_is_homogeneous_tuple, array_factory)

    def object_factory(cls: Any) -> Callable[[Any, Any], Any]:
        base = conv.gen_structure_attrs_fromdict(cls)
        names = _nulls_as_absent(cls)

        def structure_object(data: Any, tp: Any) -> Any:
            return base(_without_nulls(data, names), tp)

        return structure_object

    conv.register_structure_hook_factory(attrs.has, object_factory)

    conv.register_structure_hook(datetime, lambda v, _: parse_datetime(v))
    conv.register_unstructure_hook(datetime, format_datetime)

    def structure_enum_or_str(value: Any, tp: Any) -> Any:
        if value is None and type(None) in typing.get_args(tp):
            return None
        enum_cls = _enum_of_union(tp)
        assert enum_cls is not None
        text = _structure_str(value, str)
        try:
            return enum_cls(text)
        except ValueError:
            return text

    conv.register_structure_hook_func(
        lambda tp: _enum_of_union(tp) is not None, structure_enum_or_str
    )
    conv.register_unstructure_hook_func(
        lambda tp: _enum_of_union(tp) is not None,
        lambda v: v.value if isinstance(v, enum.Enum) else v,
    )

    def structure_plain_enum(value: Any, tp: type[enum.Enum]) -> Any:
        text = _structure_str(value, str)
        try:
            return tp(text)
        except ValueError:
            return text

    conv.register_structure_hook_func(
        lambda tp: isinstance(tp, type) and issubclass(tp, enum.Enum), structure_plain_enum
    )
    conv.register_unstructure_hook_func(
        lambda tp: isinstance(tp, type) and issubclass(tp, enum.Enum), lambda v: v.value
    )

    # Leave out None-valued fields on output, for every attrs class.
    def unstructure_factory(cls: type[Any]) -> Callable[[Any], dict[str, Any]]:
        base = make_dict_unstructure_fn(cls, conv)

        def unstructure_without_none(obj: Any) -> dict[str, Any]:
            return {k: v for k, v in base(obj).items() if v is not None}

        return unstructure_without_none

    conv.register_unstructure_hook_factory(attrs.has, unstructure_factory)

    # Attachment: public readers also accept other spellings of its fields.
    attachment_base = make_dict_structure_fn(Attachment, conv)
    attachment_nulls = _nulls_as_absent(Attachment)
    aliases = {
        "name": "file_name",
        "content_type": "mime_type",
        "size": "file_size",
        "download_url": "url",
    }

    def structure_attachment(data: Any, _: Any) -> Attachment:
        fields = dict(_without_nulls(data, frozenset()))
        for alias, name in aliases.items():
            if fields.get(name) is None and fields.get(alias) is not None:
                fields[name] = fields[alias]
        return attachment_base(_without_nulls(fields, attachment_nulls), Attachment)

    conv.register_structure_hook(Attachment, structure_attachment)

    # Message: the content's shape depends on message_type.
    message_base = make_dict_structure_fn(
        Message, conv, content=override(struct_hook=lambda v, _: v)
    )
    message_nulls = _nulls_as_absent(Message)

    def structure_message(data: Any, _: Any) -> Message:
        fields = dict(_without_nulls(data, message_nulls))
        content = fields.get("content")
        if content is None:
            content = {}
        if not isinstance(content, Mapping):
            raise TypeError(f"content: expected an object, got {_json_type(content)}")
        message_type = fields.get("message_type")
        if message_type == MessageType.TEXT:
            fields["content"] = conv.structure(content, TextContent)
        elif message_type == MessageType.FILE:
            fields["content"] = conv.structure(content, MediaContent)
        else:
            fields["content"] = dict(content)
        return message_base(fields, Message)

    conv.register_structure_hook(Message, structure_message)

    # AgentConfig: version plus everything else as a raw mapping.
    def structure_agent_config(data: Any, _: Any) -> AgentConfig:
        data = _without_nulls(data, frozenset({"version"}))
        rest = {k: v for k, v in data.items() if k != "version"}
        version = _structure_int(data.get("version", 0), int)
        return AgentConfig(version=version, extra=rest)

    def unstructure_agent_config(config: AgentConfig) -> dict[str, Any]:
        return {**config.extra, "version": config.version}

    conv.register_structure_hook(AgentConfig, structure_agent_config)
    conv.register_unstructure_hook(AgentConfig, unstructure_agent_config)
    return conv


converter: cattrs.Converter = _make_converter()
"""The converter for every model of :mod:`parall_bridge.models`."""


def structure(data: Any, cls: type[T]) -> T:
    """Build a model of type ``cls`` from decoded JSON (raises on a malformed shape)."""
    return converter.structure(data, cls)


def unstructure(obj: Any) -> Any:
    """Turn a model into JSON-ready data, leaving out ``None``-valued fields."""
    return converter.unstructure(obj)
