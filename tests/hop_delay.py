"""TESTS AND BENCHMARKS ONLY: a network round trip on one hop of a relay chain.

    from tests.hop_delay import delay_hop
    delay_hop(head_engine, rtt_ms=40)     # every Step from this tier to the next waits 40 ms more

`HopDelay` wraps a tier engine's `Downstream` (relay.tier: `LocalDownstream` in process, the node's
`GrpcDownstream` over gRPC) and sleeps half the round trip before a step message leaves and half after
its reply arrives, the way a real link between device and edge would add latency per message (not per
row). It is configured by the harness that builds the chain; no production flag or parser knows it.
`tests/slow_tiers.py` is the other stand-in: a delay after every engine step of a tier (slow compute).
"""
from __future__ import annotations

import asyncio


class HopDelay:
    """A Downstream that adds `rtt_ms` to every step's round trip; everything else goes to `inner`."""

    def __init__(self, inner, rtt_ms: float):
        self.inner, self.rtt_ms = inner, float(rtt_ms)

    def __getattr__(self, name):  # tier, sync, stub, close, ...: the wrapped downstream's
        return getattr(self.inner, name)

    async def step(self, msg, timeout: float):
        async def go():
            await asyncio.sleep(self.rtt_ms / 2e3)
            reply = await self.inner.step(msg, timeout)
            await asyncio.sleep(self.rtt_ms / 2e3)
            return reply
        return await asyncio.wait_for(go(), timeout)

    async def release(self, seq_ids):
        await self.inner.release(seq_ids)


def delay_hop(engine, rtt_ms: float) -> None:
    """Make the hop from `engine` (a relay.tier.TierEngine) to its next tier cost `rtt_ms` more."""
    if engine.down is None:
        raise ValueError(f"tier {engine.tier} has no next tier to delay")
    inner = engine.down.inner if isinstance(engine.down, HopDelay) else engine.down
    engine.down = inner if rtt_ms <= 0 else HopDelay(inner, rtt_ms)
