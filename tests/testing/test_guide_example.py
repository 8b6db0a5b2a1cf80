"""An agent answers a human: the whole loop of a test against the emulator."""

import pytest

from parall_bridge import AgentRuntime, ParallClient, StepType, TextContent, Turn
from parall_bridge.testing import FakeParallServer, running_gateway


class Reverse(AgentRuntime):
    """The runtime under test: it answers every message with its text reversed."""

    async def run_turn(self, turn: Turn) -> str | None:
        await turn.send_message(turn.event.text[::-1])
        return None


@pytest.mark.asyncio
async def test_the_agent_answers_a_human(parall_server: FakeParallServer) -> None:
    agent = parall_server.add_agent("Bot")  # an agent account and its API key
    ada = parall_server.add_user("Ada")  # a human
    chat = parall_server.add_chat(type="direct", members=[ada.id, agent.user_id])
    ada_key = parall_server.add_api_key(ada.id)  # a key of her own, to post as her app would
    async with ParallClient(parall_server.url, ada_key) as ada_app:
        async with running_gateway(parall_server, agent, Reverse()) as gateway:
            await ada_app.send_message(parall_server.org_id, chat.id, "hello")
            await parall_server.wait_for(lambda: gateway.stats().turns_succeeded == 1)
        # The block is left: the gateway has stopped and everything it wrote is on the server.
        page = await ada_app.get_chat_messages(parall_server.org_id, chat.id)  # newest first
    reply = page.data[0]
    assert reply.sender_id == agent.user_id
    assert isinstance(reply.content, TextContent)
    assert reply.content.text == "olleh"
    assert parall_server.dispatch_items(agent.user_id) == []  # her message was acked
    assert [s.step_type for s in parall_server.steps(agent.user_id)] == [StepType.INPUT]
