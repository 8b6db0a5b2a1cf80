"""An offline LangChain chat model that follows a script, for the LangGraph adapter's tests.

langchain-core's fake chat models cannot call tools, so this one returns the scripted
:class:`AIMessage` objects in order (their reasoning, text and tool calls with ids), streams
them in pieces as a real provider does (reasoning deltas, text deltas, tool-call chunks),
and records what it was given: the messages of each call and the names of the tools bound.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolCall
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field

Reply = Callable[[Sequence[BaseMessage]], Awaitable[AIMessage]]
"""A scripted step computed when the model is called (it may wait, or read the messages)."""


def say(
    text: str = "",
    *,
    reasoning: str = "",
    calls: Sequence[tuple[str, str, dict[str, Any]]] = (),
    style: str = "kwargs",
) -> AIMessage:
    """A scripted response: ``reasoning`` then ``text`` then tool ``calls`` ``(id, name,
    args)``. The reasoning is where providers put it: ``style="kwargs"`` in
    ``additional_kwargs["reasoning_content"]`` (DeepSeek, Ollama, Groq), ``"reasoning"`` in
    a ``reasoning`` content block (LangChain's standard blocks), ``"thinking"`` in an
    Anthropic ``thinking`` block; with a block, the text is a ``text`` block."""
    tool_calls = [ToolCall(name=name, args=args, id=call_id) for call_id, name, args in calls]
    if style == "kwargs":
        extra = {"reasoning_content": reasoning} if reasoning else {}
        return AIMessage(content=text, additional_kwargs=extra, tool_calls=tool_calls)
    if style not in _BLOCKS:
        raise ValueError(f"unknown reasoning style {style!r}")
    content: list[str | dict[str, Any]] = []
    if reasoning:
        content.append({"type": style, style: reasoning})
    if text:
        content.append({"type": "text", "text": text})
    return AIMessage(content=content, tool_calls=tool_calls)


_BLOCKS = ("reasoning", "thinking")


def _reasoning_of(message: AIMessage) -> tuple[str, str]:
    """The scripted message's reasoning style and text."""
    if isinstance(message.content, str):
        return "kwargs", str(message.additional_kwargs.get("reasoning_content", ""))
    for block in message.content:
        if isinstance(block, dict) and block.get("type") in _BLOCKS:
            style = str(block["type"])
            return style, str(block[style])
    return "reasoning", ""


def _pieces(text: str) -> list[str]:
    """``text`` in word-sized deltas (their concatenation is ``text``)."""
    words = text.split(" ")
    return [word + " " for word in words[:-1]] + [words[-1]] if text else []


class ScriptedChatModel(BaseChatModel):
    """Returns ``script``'s responses in order, streamed in pieces; records each call.

    Attributes:
        script: :class:`AIMessage` objects, or coroutine functions of the messages that
            return one (to wait on an event, or answer what the messages say).
        calls: the messages of each call, in order.
        offered: the names of the tools bound for each call.
    """

    script: list[Any]  # AIMessage | Reply (Any: pydantic would try a Reply as a message)
    calls: list[list[BaseMessage]] = Field(default_factory=list)
    offered: list[list[str]] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind the tools as a provider does (their names reach each call as ``tools``)."""
        names = [convert_to_openai_tool(tool)["function"]["name"] for tool in tools]
        return self.bind(tools=names, **kwargs)

    def _step(self, messages: list[BaseMessage], tools: Sequence[str]) -> AIMessage | Reply:
        self.calls.append(list(messages))
        self.offered.append(list(tools))
        if len(self.calls) > len(self.script):
            raise AssertionError(f"the script has {len(self.script)} responses, called again")
        step: AIMessage | Reply = self.script[len(self.calls) - 1]
        return step

    async def _respond(self, messages: list[BaseMessage], tools: Sequence[str]) -> AIMessage:
        step = self._step(messages, tools)
        message = step if isinstance(step, AIMessage) else await step(messages)
        return message.model_copy(deep=True)  # the script's own message stays as written

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        step = self._step(messages, kwargs.get("tools", ()))
        if not isinstance(step, AIMessage):
            raise AssertionError("a scripted coroutine needs the async API")
        return ChatResult(generations=[ChatGeneration(message=step.model_copy(deep=True))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        message = await self._respond(messages, kwargs.get("tools", ()))
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        message = await self._respond(messages, kwargs.get("tools", ()))
        style, reasoning = _reasoning_of(message)
        blocks = style != "kwargs"
        for piece in _pieces(reasoning):
            if blocks:
                chunk = AIMessageChunk(content=[{"type": style, style: piece, "index": 0}])
            else:
                chunk = AIMessageChunk(content="", additional_kwargs={"reasoning_content": piece})
            yield ChatGenerationChunk(message=chunk)
        for piece in _pieces(message.text):
            content: str | list[str | dict[str, Any]] = (
                [{"type": "text", "text": piece, "index": 1}] if blocks else piece
            )
            yield ChatGenerationChunk(message=AIMessageChunk(content=content))
        for index, call in enumerate(message.tool_calls):
            yield ChatGenerationChunk(
                message=AIMessageChunk(
                    content=[] if blocks else "",
                    tool_call_chunks=[
                        {
                            "type": "tool_call_chunk",
                            "id": call["id"],
                            "name": call["name"],
                            "args": json.dumps(call["args"]),
                            "index": index,
                        }
                    ],
                )
            )
