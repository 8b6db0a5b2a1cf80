"""Routing strategies (DESIGN.md section 3, "Routing")."""

from __future__ import annotations

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from parall_bridge.events import ParallEvent
from parall_bridge.routing import (
    DefaultRoutingStrategy,
    DispatchState,
    Route,
    RoutingStrategy,
    SerialRoutingStrategy,
)


def event(chat_id: str = "cht_a", message_id: str = "msg_1") -> ParallEvent:
    return ParallEvent.message(
        chat_id=chat_id, message_id=message_id, sender_id="usr_1", sender_name="Ada", text="hi"
    )


def busy(
    target: str | None = "cht_b",
    forks: frozenset[str] = frozenset(),
    max_forks: int = 4,
) -> DispatchState:
    return DispatchState(
        main_busy=True,
        main_target=target,
        fork_targets=forks,
        fork_count=len(forks),
        max_forks=max_forks,
    )


# --- DispatchState ---------------------------------------------------------------------------


def test_dispatch_state_defaults() -> None:
    state = DispatchState()
    assert state.main_busy is False
    assert state.main_target is None
    assert state.fork_targets == frozenset()
    assert state.fork_count == 0
    assert state.max_forks == 4


def test_dispatch_state_is_a_frozen_value() -> None:
    state = DispatchState(main_busy=True, main_target="cht_a")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        state.main_busy = False  # type: ignore[misc]
    assert state == DispatchState(main_busy=True, main_target="cht_a")


# --- DefaultRoutingStrategy --------------------------------------------------------------------


def test_idle_main_runs_now() -> None:
    assert DefaultRoutingStrategy().route(event(), DispatchState()) is Route.MAIN


def test_main_busy_with_another_target_forks() -> None:
    assert DefaultRoutingStrategy().route(event("cht_a"), busy("cht_b")) is Route.NEW_FORK


def test_main_busy_with_the_same_target_buffers_for_main() -> None:
    assert DefaultRoutingStrategy().route(event("cht_a"), busy("cht_a")) is Route.BUFFER_MAIN


def test_an_open_fork_takes_its_target_even_when_main_is_busy() -> None:
    state = busy("cht_b", forks=frozenset({"cht_a"}))
    assert DefaultRoutingStrategy().route(event("cht_a"), state) is Route.BUFFER_FORK


def test_an_open_fork_takes_its_target_even_when_main_is_idle() -> None:
    state = DispatchState(fork_targets=frozenset({"cht_a"}), fork_count=1)
    assert DefaultRoutingStrategy().route(event("cht_a"), state) is Route.BUFFER_FORK
    # Another target is not affected by that fork.
    assert DefaultRoutingStrategy().route(event("cht_c"), state) is Route.MAIN


def test_explicit_max_forks_backpressure() -> None:
    strategy = DefaultRoutingStrategy(max_forks=2)
    one = busy("cht_b", forks=frozenset({"cht_x"}), max_forks=10)
    two = busy("cht_b", forks=frozenset({"cht_x", "cht_y"}), max_forks=10)
    assert strategy.route(event("cht_a"), one) is Route.NEW_FORK
    assert strategy.route(event("cht_a"), two) is Route.BUFFER_MAIN


def test_state_max_forks_is_the_fallback() -> None:
    strategy = DefaultRoutingStrategy()
    assert strategy.max_forks is None
    under = busy("cht_b", forks=frozenset({"cht_x"}), max_forks=2)
    at_cap = busy("cht_b", forks=frozenset({"cht_x", "cht_y"}), max_forks=2)
    assert strategy.route(event("cht_a"), under) is Route.NEW_FORK
    assert strategy.route(event("cht_a"), at_cap) is Route.BUFFER_MAIN


def test_explicit_max_forks_wins_over_the_state() -> None:
    state = busy("cht_b", forks=frozenset({"cht_x"}), max_forks=1)
    assert DefaultRoutingStrategy(max_forks=3).route(event("cht_a"), state) is Route.NEW_FORK


def test_max_forks_zero_never_forks() -> None:
    strategy = DefaultRoutingStrategy(max_forks=0)
    assert strategy.route(event("cht_a"), busy("cht_b")) is Route.BUFFER_MAIN
    assert strategy.route(event("cht_a"), DispatchState()) is Route.MAIN


@pytest.mark.parametrize("value", [-1, -100])
def test_negative_max_forks_is_rejected(value: int) -> None:
    with pytest.raises(ValueError, match="max_forks"):
        DefaultRoutingStrategy(max_forks=value)


TARGETS = st.sampled_from(["cht_a", "cht_b", "cht_c", "tsk_d"])


@st.composite
def states(draw: st.DrawFn) -> DispatchState:
    forks = draw(st.frozensets(TARGETS))
    main_busy = draw(st.booleans())
    return DispatchState(
        main_busy=main_busy,
        main_target=draw(st.one_of(st.none(), TARGETS)) if main_busy else None,
        fork_targets=forks,
        fork_count=len(forks),
        max_forks=draw(st.integers(0, 5)),
    )


@given(target=TARGETS, state=states(), cap=st.one_of(st.none(), st.integers(0, 5)))
def test_default_strategy_decision_table(
    target: str, state: DispatchState, cap: int | None
) -> None:
    route = DefaultRoutingStrategy(max_forks=cap).route(event(target), state)
    limit = state.max_forks if cap is None else cap
    if target in state.fork_targets:
        expected = Route.BUFFER_FORK
    elif not state.main_busy:
        expected = Route.MAIN
    elif state.main_target == target or state.fork_count >= limit:
        expected = Route.BUFFER_MAIN
    else:
        expected = Route.NEW_FORK
    assert route is expected


# --- SerialRoutingStrategy ------------------------------------------------------------------------


def test_serial_runs_now_when_idle_and_buffers_when_busy() -> None:
    strategy = SerialRoutingStrategy()
    assert strategy.route(event("cht_a"), DispatchState()) is Route.MAIN
    assert strategy.route(event("cht_a"), busy("cht_b")) is Route.BUFFER_MAIN
    assert strategy.route(event("cht_a"), busy("cht_a")) is Route.BUFFER_MAIN


@given(target=TARGETS, state=states())
def test_serial_never_forks(target: str, state: DispatchState) -> None:
    assert SerialRoutingStrategy().route(event(target), state) is not Route.NEW_FORK


# --- the protocol ---------------------------------------------------------------------------------


class AlwaysMain:
    """A user's strategy: a plain class with ``route()``, no base class."""

    def route(self, event: ParallEvent, state: DispatchState) -> Route:
        return Route.MAIN


class NoRoute:
    def decide(self, event: ParallEvent, state: DispatchState) -> Route:
        return Route.MAIN


def test_routing_strategy_is_a_runtime_checkable_protocol() -> None:
    assert isinstance(AlwaysMain(), RoutingStrategy)
    assert isinstance(DefaultRoutingStrategy(), RoutingStrategy)
    assert isinstance(SerialRoutingStrategy(), RoutingStrategy)
    assert not isinstance(NoRoute(), RoutingStrategy)
    strategy: RoutingStrategy = AlwaysMain()
    assert strategy.route(event(), busy()) is Route.MAIN


def test_routes_are_string_enums() -> None:
    assert {route.value for route in Route} == {"main", "buffer_main", "buffer_fork", "new_fork"}
    assert Route("new_fork") is Route.NEW_FORK
