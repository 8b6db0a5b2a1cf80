"""Routing: where each inbound event goes (DESIGN.md section 3, "Routing").

A :class:`RoutingStrategy` looks at the event and a :class:`DispatchState`
snapshot and answers a :class:`Route`. The gateway then applies two
invariants whatever the strategy says: events of one target run in arrival
order, and a target never has two turns at once (so an open fork for the
target takes its events, and an event never overtakes an earlier one of its
target that still waits in main's queue).
"""

from __future__ import annotations

import enum
from typing import Protocol, runtime_checkable

import attrs

from .events import ParallEvent

__all__ = [
    "DefaultRoutingStrategy",
    "DispatchState",
    "Route",
    "RoutingStrategy",
    "SerialRoutingStrategy",
]


class Route(enum.StrEnum):
    """Where an event goes."""

    MAIN = "main"
    """The main session is idle: run it now."""
    BUFFER_MAIN = "buffer_main"
    """Queue it for the main session (busy with the same target, or no fork possible)."""
    BUFFER_FORK = "buffer_fork"
    """Queue it on the open fork for its target."""
    NEW_FORK = "new_fork"
    """Fork the main session and run it in parallel (main is busy with another target)."""


@attrs.frozen
class DispatchState:
    """A snapshot of the gateway's lanes, for routing decisions.

    Attributes:
        main_busy: the main session is running a turn (or has one about to start).
        main_target: the target main is busy with, if any.
        fork_targets: targets with an open fork.
        fork_count: how many forks are open.
        max_forks: the fork cap configured on the gateway.
    """

    main_busy: bool = False
    main_target: str | None = None
    fork_targets: frozenset[str] = frozenset()
    fork_count: int = 0
    max_forks: int = 4


@runtime_checkable
class RoutingStrategy(Protocol):
    """Decides the :class:`Route` of each inbound event."""

    def route(self, event: ParallEvent, state: DispatchState) -> Route:
        """The route of ``event`` given the current ``state``."""
        ...


@attrs.frozen
class DefaultRoutingStrategy:
    """Fork-on-busy with backpressure (the seed's behaviour).

    An open fork for the target takes the event; an idle main runs it; main
    busy with the same target queues it for main; main busy with another
    target forks, unless ``max_forks`` forks are open (then main's queue).

    Attributes:
        max_forks: the fork cap; ``None`` uses the gateway's ``max_forks``.
    """

    max_forks: int | None = attrs.field(default=None)

    @max_forks.validator
    def _check(self, _: attrs.Attribute[int | None], value: int | None) -> None:
        if value is not None and value < 0:
            raise ValueError(f"max_forks must be >= 0, got {value}")

    def route(self, event: ParallEvent, state: DispatchState) -> Route:
        """See the class docstring."""
        if event.target_id in state.fork_targets:
            return Route.BUFFER_FORK
        if not state.main_busy:
            return Route.MAIN
        if state.main_target == event.target_id:
            return Route.BUFFER_MAIN
        cap = state.max_forks if self.max_forks is None else self.max_forks
        if state.fork_count >= cap:
            return Route.BUFFER_MAIN
        return Route.NEW_FORK


@attrs.frozen
class SerialRoutingStrategy:
    """Never forks: one turn at a time, everything else waits for main."""

    def route(self, event: ParallEvent, state: DispatchState) -> Route:
        """``MAIN`` when main is idle, else ``BUFFER_MAIN``."""
        if event.target_id in state.fork_targets:
            return Route.BUFFER_FORK
        return Route.BUFFER_MAIN if state.main_busy else Route.MAIN
