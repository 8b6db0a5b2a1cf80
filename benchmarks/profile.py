"""Profile the gateway's side of a perf benchmark with pyinstrument.

``python -m benchmarks.profile catch_up --items 3000 --latency 0.002`` profiles the
gateway catching up on a backlog; ``python -m benchmarks.profile live --events 5000``
profiles it under the live benchmark's stream across 50 chats. The emulator runs in a
process of its own (as in :mod:`benchmarks.perf`), so only the gateway's process is
profiled; only the measured phase is (not the set-up). The output is pyinstrument's
call tree, cut at ``--lines`` lines: what ``docs/benchmarks.md`` quotes.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Final

from pyinstrument import Profiler

from benchmarks import perf
from benchmarks.perf_emulator import EmulatorProcess

KINDS: Final = ("catch_up", "live")


async def profile_catch_up(items: int, latency: float) -> tuple[str, Profiler]:
    """Profile the gateway from its start until ``items`` pending items are acked."""
    async with EmulatorProcess.run(latency) as emulator:
        account = await emulator.call("setup", chats=perf.CHATS)
        await emulator.call("seed", agent=account["agent_id"], count=items)
        runtime = perf._BenchRuntime()
        profiler = Profiler(async_mode="disabled")
        started, cpu = time.monotonic(), time.process_time()
        profiler.start()
        async with perf._GatewayRun(emulator, account["api_key"], runtime):
            timeout = perf._ack_timeout(items, latency)
            await emulator.call(
                "wait_acked", agent=account["agent_id"], count=items, timeout=timeout
            )
            seconds = time.monotonic() - started
        profiler.stop()
        summary = (
            f"catch-up of {items} items at {latency * 1000:g} ms: {seconds:.2f} s "
            f"({items / seconds:.0f} items/s), {runtime.turns} turns, "
            f"{time.process_time() - cpu:.2f} s of CPU"
        )
        return summary, profiler


async def profile_live(events: int, latency: float) -> tuple[str, Profiler]:
    """Profile the gateway while ``events`` of the live stream are handled."""
    async with EmulatorProcess.run(latency) as emulator:
        account = await emulator.call("setup", chats=perf.CHATS)
        runtime = perf._BenchRuntime(record=False)
        async with perf._GatewayRun(emulator, account["api_key"], runtime) as run:
            await run.gateway.wait_ready()
            profiler = Profiler(async_mode="disabled")
            profiler.start()
            stream = await perf._stream(emulator, account["agent_id"], 200, events, 500)
            profiler.stop()
        summary = (
            f"live stream of {events} events at {latency * 1000:g} ms: "
            f"{stream.per_second:.0f} events/s, {stream.cpu_ms_per_event:.3f} ms of CPU each"
        )
        return summary, profiler


def main(argv: list[str] | None = None) -> int:
    """Run one profile and print its summary and call tree."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__)
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("--items", type=int, default=3000, help="catch-up backlog")
    parser.add_argument("--events", type=int, default=5000, help="live events measured")
    parser.add_argument("--latency", type=float, default=0.002, help="REST round trip (s)")
    parser.add_argument("--lines", type=int, default=40, help="lines of the tree to print")
    args = parser.parse_args(argv)
    if args.kind == "catch_up":
        summary, profiler = asyncio.run(profile_catch_up(args.items, args.latency))
    else:
        summary, profiler = asyncio.run(profile_live(args.events, args.latency))
    print(summary)
    tree = profiler.output_text(unicode=False, color=False, show_all=False)
    print("\n".join(tree.splitlines()[: args.lines]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
