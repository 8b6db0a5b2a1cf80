"""Where events come from: live frames, ``dispatch.new``, and catch-up items.

Each path turns a platform object into a :class:`ParallEvent`, claims it in the
ledger (so no other path dispatches it too), hands the event to the ledger and
its key to the lanes. The live path applies the group routing filters of
DESIGN.md section 3; items from the dispatch queue were routed to the agent by
the platform and are handled as they are. What needs no turn (deleted, sent by
the agent, nothing to read) is settled by the ledger, whose ack plan goes to
the writer: nothing here acks on its own.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

import attrs

from .._retry import is_transient
from ..client import ParallClient
from ..errors import NotFoundError, ParallError
from ..events import EventAttachment, EventOrigin, ParallEvent
from ..models import (
    AgentStep,
    Chat,
    ChatType,
    ChatUpdate,
    DispatchEventType,
    DispatchItem,
    MediaContent,
    Message,
    MessageType,
    RoutingMode,
    SourceType,
    StepType,
    TargetType,
    Task,
    TaskStatus,
    TextContent,
)
from .lanes import Lanes
from .ledger import Claim, Ledger, Record, Verdict
from .turns import ERROR_MESSAGE_LIMIT
from .writer import PlatformWriter

__all__ = ["ChatCache", "Gate", "ItemOutcome", "Sources", "chat_key", "item_key", "task_key"]

_log = logging.getLogger("parall_bridge.gateway.sources")

Gate = Callable[[], Awaitable[None]]
"""Awaited by an item's handler right before it hands the event to a lane: returns once
every earlier item of the same chat was handled (:class:`~.pipeline.ItemPipeline`)."""

CHAT_PAGE_SIZE = 100
DISPATCHABLE_TASK_STATUSES = frozenset({TaskStatus.TODO, TaskStatus.IN_PROGRESS})


class ChatCache:
    """Chats by id: loaded on hello, kept by ``chat.update``, fetched on demand."""

    def __init__(self, client: ParallClient, org_id: str) -> None:
        self._client = client
        self._org_id = org_id
        self._chats: dict[str, Chat] = {}

    def __len__(self) -> int:
        return len(self._chats)

    async def load(self) -> int:
        """Load every chat (paginated); returns how many."""
        count = 0
        async for chat in self._client.iter_chats(self._org_id, page_size=CHAT_PAGE_SIZE):
            self._chats[chat.id] = chat
            count += 1
        return count

    def apply(self, update: ChatUpdate) -> None:
        """Apply a ``chat.update``: changed fields replace the cached ones; an unknown
        chat is added when the update names its type."""
        changes = update.changes
        existing = self._chats.get(update.chat_id)
        if existing is None:
            if changes.type is None:
                return
            existing = Chat(id=update.chat_id, type=changes.type)
        self._chats[update.chat_id] = attrs.evolve(
            existing,
            type=existing.type if changes.type is None else changes.type,
            name=existing.name if changes.name is None else changes.name,
            agent_routing_mode=existing.agent_routing_mode
            if changes.agent_routing_mode is None
            else changes.agent_routing_mode,
        )

    async def get(self, chat_id: str) -> Chat:
        """The chat, from the cache or the platform (raises :class:`ParallError`)."""
        chat = self._chats.get(chat_id)
        if chat is None:
            chat = await self._client.get_chat(self._org_id, chat_id)
            self._chats[chat_id] = chat
        return chat


def chat_key(chat_id: str) -> str:
    """The order key of a chat's events (:class:`~.pipeline.ItemPipeline`)."""
    return f"chat:{chat_id}"


def task_key(task_id: str) -> str:
    """The order key of a task's events."""
    return f"task:{task_id}"


def item_key(item: DispatchItem) -> str:
    """The order key of a dispatch item: its chat's, or its task's."""
    if item.event_type == DispatchEventType.TASK_ASSIGN or (
        item.source_type == SourceType.TASK_ACTIVITY
    ):
        return task_key(item.task_id or item.source_id or "")
    if item.chat_id:
        return chat_key(item.chat_id)
    return f"source:{item.source_id}"


async def _no_gate() -> None:
    return None


class ItemOutcome(enum.Enum):
    """What became of one dispatch item."""

    DISPATCHED = "dispatched"
    ATTACHED = "attached"
    ACKED = "acked"
    SKIPPED_OLD = "skipped_old"
    LEFT_PENDING = "left_pending"
    UNREADABLE = "unreadable"


@attrs.frozen
class _Source:
    type: str
    id: str


class Sources:
    """Turns live frames and dispatch items into claimed, routed events."""

    def __init__(
        self,
        *,
        client: ParallClient,
        org_id: str,
        agent_id: str,
        ledger: Ledger,
        lanes: Lanes,
        writer: PlatformWriter,
        chats: ChatCache,
        clock: Callable[[], float],
        dead_letter: Callable[[Sequence[ParallEvent], BaseException, int], None],
        max_body_chars: int = 100_000,
    ) -> None:
        self._dead_letter = dead_letter
        self._client = client
        self._max_body_chars = max_body_chars
        self._org_id = org_id
        self._agent_id = agent_id
        self._ledger = ledger
        self._lanes = lanes
        self._writer = writer
        self._chats = chats
        self._clock = clock

    def _claim(
        self,
        key: str,
        source_type: str,
        source_id: str,
        origin: EventOrigin,
        dispatch_id: str | None = None,
    ) -> Claim:
        return self._ledger.claim(
            key,
            source_type=source_type,
            source_id=source_id,
            origin=origin,
            now=self._clock(),
            dispatch_id=dispatch_id,
        )

    # --- live ------------------------------------------------------------------------

    async def on_message(self, message: Message, gate: Gate | None = None) -> bool:
        """A ``message.new``: returns whether it was routed. ``gate`` is awaited right
        before it goes to its lane."""
        if message.sender_id == self._agent_id:
            return False
        if message.message_type not in (MessageType.TEXT, MessageType.FILE):
            return False
        claim = self._claim(message.id, SourceType.MESSAGE, message.id, EventOrigin.LIVE)
        if not claim.claimed:
            # When a dispatch item of it is being fetched, the ledger keeps the message in
            # hand, in case that fetch fails (then it is routed from here: _message_item).
            self._ledger.hold(message.id, message)
            _log.debug("message %s already claimed (%s)", message.id, claim.verdict.value)
            return False
        try:
            return await self._route_live(message, gate or _no_gate)
        finally:
            # Whatever stopped it short of a lane (a filter, an error, a cancellation),
            # the claim must not outlive it; once queued this is a no-op.
            self._ledger.release(message.id)

    async def _route_live(self, message: Message, gate: Gate) -> bool:
        try:
            chat = await self._chats.get(message.chat_id)
        except ParallError as exc:
            _log.warning(
                "cannot resolve chat %s, skipping %s: %s", message.chat_id, message.id, str(exc)
            )
            return False
        if chat.org_id is not None and chat.org_id != self._org_id:
            _log.warning(
                "skipping message %s of a chat of another org (%s)", message.id, chat.org_id
            )
            return False
        if not self._handled_live(message, chat):
            # Not for the live path; if the platform routes it anyway (smart mode),
            # dispatch.new or catch-up brings it back.
            return False
        event = await self._message_event(message, chat, EventOrigin.LIVE, None)
        if event is None:
            return False
        await gate()
        return self._submit(event)

    def _submit(self, event: ParallEvent) -> bool:
        """Hand a claimed event to the ledger and its key to the lanes."""
        self._ledger.offer(event.key, event)
        return self._lanes.submit((event.key,)) is not None

    def _handled_live(self, message: Message, chat: Chat) -> bool:
        """The group routing filters: passive and smart groups only take @mentions of
        the agent or @all live; active groups and direct chats take everything."""
        if chat.type != ChatType.GROUP or chat.agent_routing_mode == RoutingMode.ACTIVE:
            return True
        content = message.content
        if isinstance(content, TextContent) and message.message_type == MessageType.TEXT:
            return content.mentions_user(self._agent_id)
        return False

    async def on_task(self, task: Task, gate: Gate | None = None) -> bool:
        """A ``task.assigned``: returns whether it was routed. Only a task of this org,
        assigned to this agent, to do or in progress, is. ``gate`` is awaited before it
        is claimed."""
        if not self._ours(task):
            return False
        if task.status not in DISPATCHABLE_TASK_STATUSES:
            return False
        event = self._task_event(task, EventOrigin.LIVE, None)
        if gate is not None:
            await gate()
        claim = self._claim(event.key, SourceType.TASK_ACTIVITY, task.id, EventOrigin.LIVE)
        if not claim.claimed:
            _log.info("skipping already-dispatched task %s", task.identifier or task.id)
            return False
        return self._submit(event)

    # --- dispatch items (dispatch.new and catch-up) ----------------------------------------

    async def on_item(
        self,
        item: DispatchItem,
        origin: EventOrigin,
        cutoff: datetime | None = None,
        gate: Gate | None = None,
    ) -> ItemOutcome:
        """Handle one pending dispatch item: dispatch its source at once unless the
        ledger knows it (in flight: the row is attached; done: acked by id). An item
        created before ``cutoff`` whose source the ledger does not know is settled
        without a turn (the cold-start rule). ``gate`` is awaited right before the
        event goes to its lane (the items before it in its chat went first)."""
        gate = gate or _no_gate
        if (
            cutoff is not None
            and item.created_at is not None
            and item.created_at < cutoff
            and self._ledger.by_source(item.source_type or "", item.source_id or "") is None
        ):
            self._writer.ack(self._ledger.ack_row(item.id))
            return ItemOutcome.SKIPPED_OLD
        if item.event_type == DispatchEventType.TASK_ASSIGN or (
            item.source_type == SourceType.TASK_ACTIVITY
        ):
            return await self._task_item(item, origin, gate)
        if item.event_type == DispatchEventType.MESSAGE or item.source_type == SourceType.MESSAGE:
            return await self._message_item(item, origin, gate)
        _log.info("leaving dispatch item %s of unknown type %r pending", item.id, item.event_type)
        return ItemOutcome.LEFT_PENDING

    def in_hand(self, item: DispatchItem) -> bool:
        """Whether the event of a message item is already known (the usual
        ``dispatch.new`` after its ``message.new``): handling it fetches nothing."""
        if item.event_type == DispatchEventType.TASK_ASSIGN or not item.source_id:
            return False
        record = self._ledger.by_source(SourceType.MESSAGE, item.source_id)
        return record is not None and record.event is not None

    def _settle_unclaimed(self, claim: Claim, item: DispatchItem) -> ItemOutcome:
        verdict = claim.verdict
        if (
            verdict is Verdict.DONE
            and claim.record is not None
            and self._ledger.ack_covers(claim.record.key, item.id)
        ):
            return ItemOutcome.ACKED  # its ack is on its way already
        if verdict is Verdict.DONE or (verdict is Verdict.DEAD and self._ledger.ack_dead):
            self._writer.ack(self._ledger.ack_row(item.id))
            return ItemOutcome.ACKED
        if verdict is Verdict.DEAD:
            return ItemOutcome.LEFT_PENDING
        return ItemOutcome.ATTACHED

    async def _message_item(
        self, item: DispatchItem, origin: EventOrigin, gate: Gate
    ) -> ItemOutcome:
        message_id = item.source_id
        if not message_id:
            return ItemOutcome.LEFT_PENDING
        claim = self._claim(message_id, SourceType.MESSAGE, message_id, origin, item.id)
        if not claim.claimed:
            return self._settle_unclaimed(claim, item)
        try:
            outcome = await self._dispatch_message_item(
                item, message_id, origin, claim.record, gate
            )
        finally:
            parked = self._ledger.release(message_id)  # a no-op once queued or settled
        if parked is not None and outcome is ItemOutcome.LEFT_PENDING:
            # The message arrived live while its fetch failed: it is in hand, so it is
            # routed now rather than at the next reconcile pass.
            _log.info("routing message %s from its live delivery", message_id)
            await self.on_message(parked)
        return outcome

    async def _dispatch_message_item(
        self,
        item: DispatchItem,
        message_id: str,
        origin: EventOrigin,
        record: Record | None,
        gate: Gate,
    ) -> ItemOutcome:
        if record is not None and record.event is not None:
            # A failed event due for retry: the stored event is dispatched again.
            await gate()
            self._lanes.submit((record.key,))
            return ItemOutcome.DISPATCHED
        try:
            message = await self._client.get_message(message_id)
        except NotFoundError:
            _log.info("message %s is gone: acking its dispatch item", message_id)
            return self._dismiss(item, message_id, origin)
        except ParallError as exc:
            if not is_transient(exc):
                return self._unreadable(item, message_id, SourceType.MESSAGE, origin, exc)
            _log.warning("cannot fetch message %s, leaving it pending: %s", message_id, str(exc))
            return ItemOutcome.LEFT_PENDING
        if message.sender_id == self._agent_id:
            return self._dismiss(item, message_id, origin)
        try:
            chat = await self._chats.get(item.chat_id or message.chat_id)
        except ParallError as exc:
            _log.warning("cannot resolve chat of %s, leaving it pending: %s", message_id, str(exc))
            return ItemOutcome.LEFT_PENDING
        event = await self._message_event(message, chat, origin, item.id)
        if event is None:
            return self._dismiss(item, message_id, origin)
        await gate()
        self._submit(event)
        return ItemOutcome.DISPATCHED

    def _unreadable(
        self,
        item: DispatchItem,
        key: str,
        source_type: str,
        origin: EventOrigin,
        error: ParallError,
    ) -> ItemOutcome:
        """A source that cannot be read for a reason that is not transient (too large,
        never decodes): it counts an attempt in the ledger, as a failed turn does, and is
        dead-lettered at ``max_dispatch_attempts``, instead of being fetched on every pass."""
        text = f"{type(error).__name__}: {error}"[:ERROR_MESSAGE_LIMIT]
        failure = self._ledger.fetch_failed(
            key,
            text,
            source_type=source_type,
            source_id=item.source_id or key,
            origin=origin,
            now=self._clock(),
            dispatch_id=item.id,
        )
        target_type, target_id = (
            (TargetType.CHAT, item.chat_id) if item.chat_id else (TargetType.TASK, item.task_id)
        )
        self._writer.step(
            AgentStep(
                step_type=StepType.ERROR,
                target_type=target_type,
                target_id=target_id,
                content={"message": f"cannot read {key}: {text}", "attempts": failure.attempts},
            )
        )
        _log.warning(
            "cannot read %s (attempt %d of %d): %s",
            key,
            failure.attempts,
            self._ledger.max_attempts,
            text,
        )
        for plan in failure.acks:
            self._writer.ack(plan)
        if not failure.retrying:
            placeholder = ParallEvent.message(
                chat_id=item.chat_id or "",
                message_id=key,
                sender_id="",
                sender_name="unknown",
                text=f"[unreadable: {text}]",
                origin=origin,
                dispatch_id=item.id,
            )
            self._dead_letter((placeholder,), error, failure.attempts)
        return ItemOutcome.UNREADABLE

    def _dismiss(self, item: DispatchItem, message_id: str, origin: EventOrigin) -> ItemOutcome:
        """A claimed message that needs no turn: the ledger settles it (so a later row of
        it is acked too) and plans the ack of this row."""
        plan = self._ledger.dismiss(
            message_id,
            source_type=SourceType.MESSAGE,
            source_id=message_id,
            origin=origin,
            dispatch_id=item.id,
        )
        self._writer.ack(plan)
        return ItemOutcome.ACKED

    async def _task_item(self, item: DispatchItem, origin: EventOrigin, gate: Gate) -> ItemOutcome:
        task_id = item.task_id or item.source_id
        if not task_id:
            return ItemOutcome.LEFT_PENDING
        # The row does not say which assignment it is: the task is fetched to know its
        # version (a newer one than the turn running for the task must run too).
        try:
            task = await self._client.get_task(self._org_id, task_id)
        except NotFoundError:
            _log.info("task %s is gone: acking its dispatch item", task_id)
            self._writer.ack(self._ledger.ack_row(item.id))
            return ItemOutcome.ACKED
        except ParallError as exc:
            if not is_transient(exc):
                # Which assignment it is cannot be known: the task's unversioned key.
                key = f"{task_id}@"
                return self._unreadable(item, key, SourceType.TASK_ACTIVITY, origin, exc)
            _log.warning("cannot fetch task %s, leaving it pending: %s", task_id, str(exc))
            return ItemOutcome.LEFT_PENDING
        if not self._ours(task):
            self._writer.ack(self._ledger.ack_row(item.id))
            return ItemOutcome.ACKED
        if task.status not in DISPATCHABLE_TASK_STATUSES:
            _log.info("skipping task dispatch %s: the task is %s", item.id, task.status)
            self._writer.ack(self._ledger.ack_row(item.id))
            return ItemOutcome.ACKED
        event = self._task_event(task, origin, item.id)
        await gate()
        claim = self._claim(event.key, SourceType.TASK_ACTIVITY, task.id, origin, item.id)
        if not claim.claimed:
            return self._settle_unclaimed(claim, item)
        record = claim.record
        if record is not None and record.event is not None:
            self._lanes.submit((record.key,))  # a failed event due for retry
        else:
            self._submit(event)
        return ItemOutcome.DISPATCHED

    # --- retries -------------------------------------------------------------------------

    def retry_due(self) -> int:
        """Dispatch again every failed event (or pinned turn) whose retry time has come."""
        count = 0
        for keys in self._ledger.take_due(self._clock()):
            record = self._ledger.get(keys[0])
            _log.info(
                "retrying %s (attempt %d)", ", ".join(keys), (record.attempts if record else 0) + 1
            )
            self._lanes.submit(keys)
            count += 1
        return count

    # --- building events -------------------------------------------------------------------

    def _ours(self, task: Task) -> bool:
        """Whether a task is this agent's in this org (else it is logged and skipped)."""
        if task.org_id is not None and task.org_id != self._org_id:
            _log.warning(
                "skipping task %s of another org (%s): not dispatched", task.id, task.org_id
            )
            return False
        if task.assignee_id != self._agent_id:
            _log.info("skipping task %s: assigned to %s, not this agent", task.id, task.assignee_id)
            return False
        return True

    def _task_event(self, task: Task, origin: EventOrigin, dispatch_id: str | None) -> ParallEvent:
        if task.description is not None:
            task = attrs.evolve(task, description=self._bounded(task.description, task.id))
        return ParallEvent.task(task, origin=origin, dispatch_id=dispatch_id)

    def _bounded(self, text: str, source_id: str) -> str:
        """``text`` cut to ``max_body_chars``, with a visible marker (and a WARNING)."""
        limit = self._max_body_chars
        if len(text) <= limit:
            return text
        _log.warning(
            "%s has %d characters: only the first %d reach the turn", source_id, len(text), limit
        )
        return text[:limit] + f"\n[... truncated: {len(text) - limit} more characters]"

    async def _message_event(
        self, message: Message, chat: Chat, origin: EventOrigin, dispatch_id: str | None
    ) -> ParallEvent | None:
        """The event of a text or file message (``None`` when there is nothing to read)."""
        content = message.content
        attachments: list[EventAttachment] = []
        seen: set[str] = set()
        if message.message_type == MessageType.TEXT and isinstance(content, TextContent):
            text = self._bounded(content.text.strip(), message.id)
            if not text:
                return None
        elif message.message_type == MessageType.FILE and isinstance(content, MediaContent):
            text = self._bounded(
                (content.caption or "").strip() or f"[file: {content.file_name or 'attachment'}]",
                message.id,
            )
            if content.attachment_id:
                seen.add(content.attachment_id)
                url = await self._file_url(content.attachment_id)
                if url:
                    attachments.append(EventAttachment(content.mime_type or "file", url))
        else:
            return None
        for attachment in message.attachments:
            if attachment.id in seen:
                continue
            seen.add(attachment.id)
            url = attachment.url or await self._file_url(attachment.id)
            if url:
                attachments.append(EventAttachment(attachment.mime_type or "file", url))
        for attachment_id in message.attachment_ids:
            # Ids the server listed without their objects (PROTOCOL.md allows either).
            if attachment_id in seen:
                continue
            seen.add(attachment_id)
            url = await self._file_url(attachment_id)
            if url:
                attachments.append(EventAttachment("file", url))
        return ParallEvent.message(
            chat_id=message.chat_id,
            message_id=message.id,
            sender_id=message.sender_id,
            sender_name=message.sender_name,
            text=text,
            chat_name=chat.name or None,
            chat_type=chat.type,
            thread_root_id=message.thread_root_id,
            no_reply=message.no_reply,
            attachments=attachments,
            created_at=message.created_at,
            origin=origin,
            dispatch_id=dispatch_id,
        )

    async def _file_url(self, attachment_id: str) -> str | None:
        try:
            return (await self._client.get_file_url(attachment_id)).url
        except ParallError as exc:
            _log.warning("cannot get a URL for attachment %s: %s", attachment_id, str(exc))
            return None
