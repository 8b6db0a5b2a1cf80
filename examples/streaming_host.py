"""A host for a streaming SDK: yield typed events, the gateway records them as steps."""

import asyncio
from collections.abc import AsyncIterator

from parall_bridge import (
    EventStreamRuntime,
    Gateway,
    GatewayConfig,
    ReasoningDelta,
    ReasoningEnd,
    ResponseStart,
    StreamEvent,
    Text,
    ToolCall,
    ToolResult,
    Turn,
)


class StreamingRuntime(EventStreamRuntime):
    """Stands in for an SDK's event stream (OpenAI Agents SDK, LangGraph, pydantic-ai...)."""

    async def events(self, turn: Turn) -> AsyncIterator[StreamEvent]:
        yield ResponseStart()
        yield ReasoningDelta("Looking up ")
        yield ReasoningDelta("the weather.")
        yield ReasoningEnd()
        yield ToolCall("call-1", "weather", {"city": "Paris"})
        yield ToolResult("call-1", output={"forecast": "sunny"})
        if turn.chat_id:
            await turn.send_message("It will be sunny in Paris.")
        yield Text("Told them: sunny.")


async def main() -> None:
    abort = asyncio.Event()
    await Gateway(GatewayConfig.from_env(), StreamingRuntime()).start(abort)


if __name__ == "__main__":
    asyncio.run(main())
