"""A complete host: an OpenAI Agents SDK agent on Parall. Run it with PRLL_API_URL,
PRLL_API_KEY and PRLL_ORG_ID set (``python -m parall_bridge emulator`` prints a local set).

The model: set PRLL_EXAMPLE_MODEL to a real one (e.g. ``gpt-5-mini``, with OPENAI_API_KEY
set). Without it, the agent runs on an offline scripted model (the SDK's own
``agents.testing.ScriptedModel``) that thinks, then answers "You said: <your last line>"
through the send_message tool: the example runs anywhere, with no key and no network.
``main(model)`` also takes any ``agents.Model`` (the test suite passes its own).

Tracing is disabled here: by default the SDK exports traces to OpenAI. Remove
``tracing_disabled=True`` to see the runs in the OpenAI dashboard.
"""

import asyncio
import os
import signal

from agents import Agent, Model, RunConfig
from agents.items import TResponseOutputItem
from agents.testing import ModelCall, ModelStep, ScriptedModel, assistant_message, function_call
from openai.types.responses import ResponseReasoningItem
from openai.types.responses.response_reasoning_item import Summary

from parall_bridge import Gateway, GatewayConfig
from parall_bridge.adapters.openai_agents import OpenAIAgentsRuntime

INSTRUCTIONS = (
    "You are a helpful teammate on Parall. Answer the last message with the send_message "
    "tool; use get_chat_history when you need more of the conversation."
)


def offline_model() -> ScriptedModel:
    """A model that needs no network: it echoes the prompt's last line via send_message."""
    model = ScriptedModel()

    def answer(call: ModelCall) -> list[TResponseOutputItem]:
        model.enqueue(ModelStep.respond(answer))  # one more answer for the next call
        last = call.input[-1]
        if last.get("type") == "function_call_output":
            return [assistant_message("Replied.")]
        said = str(last.get("content", "")).strip().splitlines()[-1:] or [""]
        thought = Summary(text=f"They wrote {said[0]!r}; I echo it.", type="summary_text")
        return [
            ResponseReasoningItem(id=f"rs_{len(model.calls)}", type="reasoning", summary=[thought]),
            function_call(
                "send_message", {"text": f"You said: {said[0]}"}, call_id=f"call_{len(model.calls)}"
            ),
        ]

    model.enqueue(ModelStep.respond(answer))
    return model


def build_agent(model: Model | str) -> Agent:
    """The host's agent, as any OpenAI Agents SDK app builds it."""
    return Agent(name="Assistant", instructions=INSTRUCTIONS, model=model)


async def main(model: Model | str | None = None) -> None:
    abort = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, abort.set)
    if model is None:
        model = os.environ.get("PRLL_EXAMPLE_MODEL") or offline_model()
    agent = build_agent(model)
    runtime = OpenAIAgentsRuntime(agent, run_config=RunConfig(tracing_disabled=True))
    config = GatewayConfig.from_env(state_path="openai_agents_host.db")  # a restart resumes
    try:
        await Gateway(config, runtime).start(abort)  # runs until Ctrl-C, then stops cleanly
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


if __name__ == "__main__":
    asyncio.run(main())
