"""The offline model of the OpenAI Agents SDK tests: the SDK's own scripted test model
(``agents.testing.ScriptedModel``, shipped in the package since 0.24), driven by a function
of each model call so that concurrent runs (main and a fork) each get their answer.

:class:`Replier` is the usual "brain": for a prompt it reasons, then calls
``send_message`` with ``You said: <the prompt's last line>``; for the tool's result it ends
with ``Replied.``. Every call id it gives is new and kept in :attr:`Replier.call_ids`.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeAlias

from agents.items import ModelResponse, TResponseOutputItem
from agents.models.interface import Model
from agents.testing import ModelCall, ModelStep, ScriptedModel, assistant_message, function_call
from openai.types.responses import ResponseReasoningItem
from openai.types.responses.response_reasoning_item import Summary

Output: TypeAlias = list[TResponseOutputItem]
Respond: TypeAlias = Callable[[ModelCall], Output | Awaitable[Output]]

REPLIED = "Replied."


def offline_model(respond: Respond) -> ScriptedModel:
    """A ``ScriptedModel`` whose every call is answered by ``respond`` (with the call: its
    input items, tools, settings); ``respond`` may be async (a model that blocks)."""
    model = ScriptedModel()

    async def step(call: ModelCall) -> Output:
        model.enqueue(ModelStep.respond(step))  # there is always a next call
        answer = respond(call)
        if inspect.isawaitable(answer):
            return await answer
        return answer

    model.enqueue(ModelStep.respond(step))
    return model


class WholeReasoning(Model):
    """A model that gives its reasoning whole, in the finished response only (no deltas),
    as some providers do: ``inner``'s stream without its reasoning events."""

    def __init__(self, inner: Model) -> None:
        self.inner = inner

    async def get_response(self, *args: Any, **kwargs: Any) -> ModelResponse:
        return await self.inner.get_response(*args, **kwargs)

    async def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async for event in self.inner.stream_response(*args, **kwargs):
            if not event.type.startswith("response.reasoning_"):
                yield event


def reasoning(text: str, item_id: str) -> TResponseOutputItem:
    """A reasoning item with one summary part (streamed as summary deltas)."""
    return ResponseReasoningItem(
        id=item_id, type="reasoning", summary=[Summary(text=text, type="summary_text")]
    )


def text_of(item: object) -> str:
    """The text of a message input item ('' for anything else)."""
    content = item.get("content") if isinstance(item, Mapping) else None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, Mapping))
    return ""


def last_item(call: ModelCall) -> Mapping[str, Any]:
    """The last input item of a model call."""
    items: Sequence[Mapping[str, Any]] = call.input
    return items[-1]


def tool_outputs(call: ModelCall) -> dict[str, str]:
    """The call's function-call outputs by call id."""
    return {
        str(item["call_id"]): str(item["output"])
        for item in call.input
        if isinstance(item, Mapping) and item.get("type") == "function_call_output"
    }


class Replier:
    """Answers each prompt by calling ``send_message`` with ``You said: <last line>``.

    Args:
        tool: the tool to call instead of ``send_message`` (name and arguments), for the
            prompts that ``when`` accepts.
        when: which prompts get ``tool`` (default: none).
    """

    def __init__(
        self,
        tool: tuple[str, Mapping[str, Any]] | None = None,
        when: Callable[[str], bool] = lambda prompt: False,
    ) -> None:
        self.tool = tool
        self.when = when
        self.calls: list[ModelCall] = []
        self.call_ids: list[str] = []
        self._ids = itertools.count(1)

    def new_id(self, prefix: str) -> str:
        """A fresh id (``call_<n>``, ``rs_<n>``...)."""
        return f"{prefix}_{next(self._ids)}"

    def __call__(self, call: ModelCall) -> Output:
        self.calls.append(call)
        last = last_item(call)
        if last.get("type") == "function_call_output":
            return [assistant_message(REPLIED, item_id=self.new_id("msg"))]
        prompt = text_of(last)
        if prompt.startswith("[Fork result]"):
            return [assistant_message("Noted.", item_id=self.new_id("msg"))]
        said = prompt.strip().splitlines()[-1] if prompt.strip() else ""
        name: str = "send_message"
        args: Mapping[str, Any] = {"text": f"You said: {said}"}
        if self.tool is not None and self.when(prompt):
            name, args = self.tool
        call_id = self.new_id("call")
        self.call_ids.append(call_id)
        return [
            reasoning(f"They wrote {said!r}; I answer with {name}.", self.new_id("rs")),
            function_call(name, dict(args), call_id=call_id),
        ]
