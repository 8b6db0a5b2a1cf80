"""The demo behind ``make demo``: the library against the built-in Parall emulator.

Runs the REST client through a short scripted session (who am I, list chats,
post and read messages, upload a file, page and ack the dispatch queue) and
prints what it did.
"""

from __future__ import annotations

from collections.abc import Callable

from .client import ParallClient
from .models import TextContent
from .testing import FakeParallServer

__all__ = ["run_demo"]


async def run_demo(say: Callable[[str], None]) -> int:
    """Run the demo, printing through ``say``; returns the exit status (0)."""
    async with FakeParallServer(org_id="org_demo") as server:
        org = server.org_id
        agent = server.add_agent("Demo Agent")
        ada = server.add_user("Ada Lovelace")
        direct = server.add_chat(type="direct", members=[ada.id, agent.user_id])
        team = server.add_chat(type="group", name="Launch team", members=[ada.id, agent.user_id])
        say(f"Parall emulator running at {server.url}")
        async with ParallClient(server.url, agent.api_key) as client:
            me = await client.get_me()
            say(f"[rest] authenticated as {me.display_name} ({me.id})")

            chats = [chat async for chat in client.iter_chats(org)]
            for chat in chats:
                label = f'"{chat.name}"' if chat.name else "(direct)"
                say(f"[rest] chat {chat.id} {label} type={chat.type}")

            server.post_message(direct.id, ada.id, "Hi! Can you send me the launch checklist?")
            server.post_message(
                team.id, ada.id, "@Demo Agent status please", mentions=[agent.user_id]
            )
            server.post_message(team.id, ada.id, "(chatter the agent is not asked about)")
            say("[emulator] Ada posted 3 messages (1 direct, 2 in the group)")

            attachment_id = await client.upload_file(
                org,
                b"1. Fuel\n2. Check weather\n3. Launch\n",
                file_name="checklist.txt",
                mime_type="text/plain",
            )
            say(f"[rest] uploaded checklist.txt as {attachment_id}")
            sent = await client.send_message(
                org, direct.id, "Here it is!", attachment_ids=[attachment_id]
            )
            say(f"[rest] sent {sent.id} with {len(sent.attachments)} attachment(s)")

            history = await client.get_chat_messages(org, direct.id, limit=10)
            for message in reversed(history.data):
                text = message.content.text if isinstance(message.content, TextContent) else ""
                say(f"[rest] history {message.sender_name}: {text}")

            items = [item async for item in client.iter_dispatch(org, page_size=1)]
            say(f"[rest] dispatch queue: {len(items)} pending item(s), paged one at a time")
            for item in items:
                say(
                    f"[rest]   {item.id} {item.event_type} {item.source_id} "
                    f"reason={item.delivery_reason}"
                )
                await client.ack_dispatch_by_id(org, item.id)
            left = await client.get_dispatch(org)
            say(f"[rest] acked them; {len(left.data)} left")
        say("demo finished")
    return 0
