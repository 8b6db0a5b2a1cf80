"""The one cattrs converter that (de)serialises every model of the library.

Rules (PROTOCOL.md, "Conventions"): unknown fields are ignored; unknown enum
values are kept as plain strings; datetimes are RFC 3339 strings; absent
optional fields take their defaults; ``None``-valued optional fields are left
out on output.
"""

from __future__ import annotations

import enum
import types
import typing
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import attrs
import cattrs
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


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(
        forbid_extra_keys=False,
        unstruct_collection_overrides={tuple: list},
    )

    conv.register_structure_hook(datetime, lambda v, _: parse_datetime(v))
    conv.register_unstructure_hook(datetime, format_datetime)

    def structure_enum_or_str(value: Any, tp: Any) -> Any:
        if value is None:
            if type(None) in typing.get_args(tp):
                return None
            raise TypeError("expected a string, got null")
        enum_cls = _enum_of_union(tp)
        assert enum_cls is not None
        text = str(value)
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
        try:
            return tp(value)
        except ValueError:
            return str(value)

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

    # Message: the content's shape depends on message_type.
    message_base = make_dict_structure_fn(
        Message, conv, content=override(struct_hook=lambda v, _: v)
    )

    def structure_message(data: Any, _: Any) -> Message:
        if not isinstance(data, Mapping):
            raise TypeError("expected an object")
        fields = dict(data)
        content = fields.get("content")
        if content is None:
            content = {}
        if not isinstance(content, Mapping):
            raise TypeError("content: expected an object")
        message_type = fields.get("message_type")
        if message_type == MessageType.TEXT:
            fields["content"] = conv.structure(content, TextContent)
        elif message_type == MessageType.FILE:
            fields["content"] = conv.structure(content, MediaContent)
        else:
            fields["content"] = dict(content)
        return message_base(fields, Message)

    conv.register_structure_hook(Message, structure_message)

    # Attachment: public readers also accept other spellings of its fields.
    attachment_base = make_dict_structure_fn(Attachment, conv)
    aliases = {
        "name": "file_name",
        "content_type": "mime_type",
        "size": "file_size",
        "download_url": "url",
    }

    def structure_attachment(data: Any, _: Any) -> Attachment:
        if not isinstance(data, Mapping):
            raise TypeError("expected an object")
        fields = dict(data)
        for alias, name in aliases.items():
            if fields.get(name) is None and fields.get(alias) is not None:
                fields[name] = fields[alias]
        return attachment_base(fields, Attachment)

    conv.register_structure_hook(Attachment, structure_attachment)

    # AgentConfig: version plus everything else as a raw mapping.
    def structure_agent_config(data: Any, _: Any) -> AgentConfig:
        if not isinstance(data, Mapping):
            raise TypeError("expected an object")
        rest = {k: v for k, v in data.items() if k != "version"}
        version = data.get("version", 0)
        return AgentConfig(version=int(version) if version is not None else 0, extra=rest)

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
