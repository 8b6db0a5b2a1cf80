"""A complete host: an echo agent on Parall. Run it with PRLL_API_URL, PRLL_API_KEY and
PRLL_ORG_ID set (``python -m parall_bridge emulator`` prints a local set)."""

import asyncio
import logging
import signal

from parall_bridge import AgentRuntime, Gateway, GatewayConfig, Turn


class EchoRuntime(AgentRuntime):
    async def run_turn(self, turn: Turn) -> str | None:
        turn.reasoning(f"{turn.event.sender_name} wrote: {turn.event.text}", done=True)
        reply = f"You said: {turn.event.text}"
        if turn.chat_id:
            await turn.send_message(reply)  # posted once, even if a crash runs the turn again
        return reply  # recorded as a suppressed text step


async def main() -> None:
    abort = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, abort.set)
    config = GatewayConfig.from_env(state_path="echo_host.db")  # a restart resumes from it
    gateway = Gateway(config, EchoRuntime())
    await gateway.start(abort)  # runs until Ctrl-C, then shuts down cleanly


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)  # says when it connected, each turn, each stop
    asyncio.run(main())
