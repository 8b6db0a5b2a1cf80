"""A complete host: a Pydantic AI agent on Parall.

Run it with PRLL_API_URL, PRLL_API_KEY and PRLL_ORG_ID set (``python -m parall_bridge
emulator`` prints a local set). PRLL_EXAMPLE_MODEL picks a real model, e.g.
``openai:gpt-5.2`` (its provider's key in the environment as Pydantic AI expects); without
it the agent runs on an offline model, Pydantic AI's ``FunctionModel`` with :func:`echo`,
so the example runs anywhere (the test suite runs it so). ``main(model=...)`` and
``build_agent(model=...)`` take any Pydantic AI model or model name.
"""

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator

from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelRequest, UserPromptPart
from pydantic_ai.models import Model
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel

from parall_bridge import Gateway, GatewayConfig
from parall_bridge.adapters.pydantic_ai import PydanticAIRuntime


async def echo(
    messages: list[ModelMessage], info: AgentInfo
) -> AsyncIterator[str | DeltaToolCalls]:
    """The offline model: answers a message with ``You said: <its text>`` through the
    send_message tool, then ends the run with a short final text."""
    last = messages[-1]
    prompt = [p.content for p in last.parts if isinstance(p, UserPromptPart)]
    if isinstance(last, ModelRequest) and prompt:
        text = str(prompt[-1]).rsplit("\n", 1)[-1]  # the prompt ends with the message text
        args = json.dumps({"text": f"You said: {text}"})
        yield {0: DeltaToolCall("send_message", args, tool_call_id="echo-1")}
    else:
        yield "Replied."


def build_agent(model: Model | str | None = None) -> Agent[None, str]:
    """The host's agent: ``model``, else the offline :func:`echo` model."""
    return Agent(
        model or FunctionModel(stream_function=echo),
        instructions="You are a helpful, concise assistant.",
    )


async def main(model: Model | str | None = None) -> None:
    """Run the host until SIGINT or SIGTERM: ``model``, else PRLL_EXAMPLE_MODEL, else the
    offline model."""
    abort = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, abort.set)
    try:
        agent = build_agent(model or os.environ.get("PRLL_EXAMPLE_MODEL") or None)
        runtime = PydanticAIRuntime(agent)  # the agent gets the Parall tools on each run
        config = GatewayConfig.from_env(state_path="pydantic_ai_host.db")
        await Gateway(config, runtime).start(abort)  # runs until Ctrl-C, then shuts down
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


if __name__ == "__main__":
    asyncio.run(main())
