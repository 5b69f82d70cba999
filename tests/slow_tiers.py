"""TESTS AND BENCHMARKS ONLY: `familial-serve` with tiers made slow on purpose.

    python -m tests.slow_tiers edge=20,cloud=80 demo --port 0                  # from the repository root
    python -m tests.slow_tiers cloud=80 --tier cloud --shards DIR --port 50053

The first argument gives tiers a delay in milliseconds after every engine step (the engine's
`TierConfig.step_delay_ms`), standing in for slower remote tiers so that latency budgets have
something to choose between; the rest is `familial-serve`'s command line, unchanged. The production
parsers have no such flag: this launcher passes the delays to `serving.cli.main` as an argument.
"""
from __future__ import annotations

import sys

USAGE = "usage: python -m tests.slow_tiers TIER=MS[,TIER=MS...] FAMILIAL-SERVE-ARGS..."


def parse_delays(spec: str) -> dict[str, float]:
    """"edge=20,cloud=80" -> {"edge": 20.0, "cloud": 80.0}; ValueError for anything else."""
    out = {}
    for part in spec.split(","):
        tier, _, ms = part.partition("=")
        try:
            out[tier.strip()] = float(ms)
        except ValueError:
            out[tier.strip()] = -1.0
        if not tier.strip() or not out[tier.strip()] >= 0:
            raise ValueError(f"delays must look like TIER=MS,TIER=MS with MS >= 0, got {spec!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    from serving.cli import main as serve

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        delays = parse_delays(argv[0] if argv else "")
    except ValueError as e:
        print(f"{USAGE}\nslow_tiers: error: {e}", file=sys.stderr)
        return 2
    return serve(argv[1:], step_delays_ms=delays)


if __name__ == "__main__":
    sys.exit(main())
