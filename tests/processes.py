"""Shared by the tests that run tiers as processes: a chain started as the demo starts it."""
from __future__ import annotations


class NodeProcesses:
    """device -> edge -> cloud as node processes on loopback, started as the demo starts them
    (`serving/local_family.py`: all at once, waiting for the complete chain), so a test can stop, continue
    or kill one with `signal(name, sig)`. `heads`, `node_args` and `env` as LocalFamily's; `micro_batches`
    None is the node's default (the demo runs 1). `addr[name]` is a node's address, `log(name)` its last
    lines."""

    def __init__(self, shards, tiers=("device", "edge", "cloud"), *, heads=None, node_args=None, env=None,
                 micro_batches: int | None = 1):
        from serving.local_family import LocalFamily

        self.family = LocalFamily(shards, list(tiers), heads=heads, node_args=node_args, env=env,
                                  micro_batches=micro_batches)

    def __enter__(self) -> "NodeProcesses":
        import asyncio

        f = self.family.start()
        try:
            asyncio.run(f.chain_complete())
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.addr = self.addresses = f.addresses
        self.head, self.output = f.addresses[f.heads[0]], f.tail
        return self

    def signal(self, name: str, sig) -> None:
        self.family.procs[name].send_signal(sig)

    def log(self, name: str) -> str:
        return self.family.log(name)

    def __exit__(self, *exc) -> None:
        self.family.stop(timeout_s=20)
