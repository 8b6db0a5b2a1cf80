"""A complete host: a LangGraph agent on Parall.

Run it with PRLL_API_URL, PRLL_API_KEY and PRLL_ORG_ID set (``python -m parall_bridge
emulator`` prints a local set). The model: PRLL_EXAMPLE_MODEL names a real one for
LangChain's ``init_chat_model`` (e.g. ``openai:gpt-4.1-mini``; needs ``pip install
langchain langchain-openai`` and the provider's key); without it the host runs
``OfflineModel``, which needs no network and answers each message "You said: ..." with
the send_message tool. ``main(model)`` takes any LangChain chat model (the tests pass
an offline scripted one).
"""

import asyncio
import importlib
import os
import signal
import uuid
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from parall_bridge import Gateway, GatewayConfig
from parall_bridge.adapters.langgraph import LangGraphRuntime

SYSTEM = (
    "You are a helpful agent in a team chat. Answer with the send_message tool: "
    "what you write outside it is not posted."
)


class OfflineModel(BaseChatModel):
    """A model without network: it answers each message "You said: <text>" by calling
    send_message, then ends the turn."""

    @property
    def _llm_type(self) -> str:
        return "offline-echo"

    def bind_tools(self, tools: Any, **kwargs: Any) -> "OfflineModel":
        return self  # it knows the one tool it calls

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        last = messages[-1]
        if isinstance(last, ToolMessage):
            reply = AIMessage("Replied.")
        else:
            text = str(last.content).split("\n\n", 1)[-1]  # the prompt's text, after its header
            call = {"name": "send_message", "args": {"text": f"You said: {text}"}}
            reply = AIMessage(
                "",
                additional_kwargs={"reasoning_content": f"They wrote: {text}"},
                tool_calls=[{**call, "id": f"call_{uuid.uuid4().hex[:12]}"}],
            )
        return ChatResult(generations=[ChatGeneration(message=reply)])

    async def _agenerate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        return self._generate(messages)


def default_model() -> BaseChatModel:
    """The model PRLL_EXAMPLE_MODEL names, else the offline one."""
    name = os.environ.get("PRLL_EXAMPLE_MODEL")
    if not name:
        return OfflineModel()
    chat_models = importlib.import_module("langchain.chat_models")  # pip install langchain
    model: BaseChatModel = chat_models.init_chat_model(name)
    return model


async def main(model: BaseChatModel | None = None) -> None:
    abort = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, abort.set)
    try:
        runtime = LangGraphRuntime.from_model(model or default_model(), system_prompt=SYSTEM)
        config = GatewayConfig.from_env(state_path="langgraph_host.db")  # a restart resumes
        await Gateway(config, runtime).start(abort)  # runs until Ctrl-C, then shuts down
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


if __name__ == "__main__":
    asyncio.run(main())
