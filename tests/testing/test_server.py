"""FakeParallServer itself: lifecycle, seeding helpers, inspection, wait_for."""

from __future__ import annotations

import pytest

from parall_bridge.models import AgentConfig, Chat, ChatType, RoutingMode, Task, TaskStatus, User
from parall_bridge.testing import AgentAccount, FakeParallServer


@pytest.mark.asyncio
async def test_lifecycle() -> None:
    server = FakeParallServer(org_id="org_acme")
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.url
    await server.start()
    try:
        assert server.url.startswith("http://127.0.0.1:")
        assert not server.url.endswith("/")
        assert server.ws_url == server.url.replace("http://", "ws://") + "/ws"
        assert server.org_id == "org_acme"
        with pytest.raises(RuntimeError, match="already started"):
            await server.start()
    finally:
        await server.close()
    await server.close()
    with pytest.raises(RuntimeError, match="closed"):
        await server.start()


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="max_page_size"):
        FakeParallServer(max_page_size=0)
    with pytest.raises(ValueError, match="replay_buffer_size"):
        FakeParallServer(replay_buffer_size=-1)
    with pytest.raises(ValueError, match="dispatch_delay"):
        FakeParallServer(dispatch_delay=-1)


@pytest.mark.asyncio
async def test_seeding_helpers_return_models(parall_server: FakeParallServer) -> None:
    human = parall_server.add_user("Ada", user_id="usr_ada")
    assert human == User(id="usr_ada", display_name="Ada", type="human", status="active")
    agent = parall_server.add_agent("Bot", api_key="pk_fixed")
    assert isinstance(agent, AgentAccount)
    assert agent.user.type == "agent"
    assert agent.api_key == "pk_fixed"
    assert "pk_fixed" not in repr(agent)
    assert agent.user_id == agent.user.id
    assert agent.user_id.startswith("usr_")

    chat = parall_server.add_chat(type="group", name="ops", members=[human.id, agent.user_id])
    assert isinstance(chat, Chat)
    assert chat.id.startswith("cht_")
    assert (chat.type, chat.agent_routing_mode) == (ChatType.GROUP, RoutingMode.PASSIVE)
    updated = parall_server.update_chat(chat.id, agent_routing_mode="active", name="ops2")
    assert (updated.name, updated.agent_routing_mode) == ("ops2", RoutingMode.ACTIVE)
    assert updated.updated_at is not None
    assert chat.updated_at is not None
    assert updated.updated_at > chat.updated_at

    task = parall_server.assign_task("T", assignee_id=agent.user_id, creator_id=human.id)
    assert isinstance(task, Task)
    assert task.id.startswith("tsk_")
    assert parall_server.update_task(task.id, status="done").status is TaskStatus.DONE
    config = parall_server.set_agent_config(agent.user_id, {"models": ["a"]})
    assert config == AgentConfig(version=2, extra={"models": ["a"]})


@pytest.mark.asyncio
async def test_helpers_refuse_misuse(parall_server: FakeParallServer) -> None:
    human = parall_server.add_user("Ada")
    outsider = parall_server.add_user("Eve")
    chat = parall_server.add_chat(members=[human.id])
    with pytest.raises(ValueError, match="already exists"):
        parall_server.add_user("Ada again", user_id=human.id)
    parall_server.add_agent(api_key="pk_taken")
    with pytest.raises(ValueError, match="in use"):
        parall_server.add_agent(api_key="pk_taken")
    with pytest.raises(KeyError):
        parall_server.add_chat(members=["usr_nobody"])
    with pytest.raises(ValueError, match="not a member"):
        parall_server.post_message(chat.id, outsider.id, "hi")
    with pytest.raises(KeyError):
        parall_server.post_message("cht_nope", human.id, "hi")
    with pytest.raises(ValueError, match="thread_root_id"):
        parall_server.post_message(chat.id, human.id, "hi", thread_root_id="msg_nope")
    with pytest.raises(ValueError, match="may only change"):
        parall_server.update_chat(chat.id, members=[])
    with pytest.raises(ValueError, match="status"):
        parall_server.assign_task("T", assignee_id=human.id, creator_id=human.id, status="later")
    with pytest.raises(KeyError):
        parall_server.get_task("tsk_nope")
    with pytest.raises(KeyError):
        parall_server.uploaded_bytes("att_nope")
    with pytest.raises(KeyError):
        parall_server.revoke_key("pk_unknown")
    with pytest.raises(ValueError, match="frames"):
        parall_server.close_ws_every(0)


@pytest.mark.asyncio
async def test_wait_for(parall_server: FakeParallServer) -> None:
    flags: list[int] = []
    await parall_server.wait_for(lambda: True)
    with pytest.raises(TimeoutError, match=r"still false after 0\.05 s") as caught:
        await parall_server.wait_for(lambda: bool(flags), timeout=0.05)
    assert "test_server.py" in str(caught.value)
