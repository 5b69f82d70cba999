"""Plain dataclasses shared by the relay client, node and CLI: exit policy, sampling, step result, TLS.

They convert to and from the wire messages here so that callers (the HTTP router) never touch
protobuf. No networking, no model code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from relay.pb import pb

POLICY_KINDS = {"fixed": pb.ExitPolicy.FIXED, "max_prob": pb.ExitPolicy.MAX_PROB,
                "entropy": pb.ExitPolicy.ENTROPY, "margin": pb.ExitPolicy.MARGIN}


@dataclass
class ExitPolicy:
    kind: str = "fixed"      # "fixed" (answer from the exit asked for) | "max_prob" | "entropy" | "margin"
    threshold: float = 0.0   # max_prob/margin: exit when >= threshold; entropy (nats): exit when <= threshold

    def to_pb(self) -> "pb.ExitPolicy":
        if self.kind not in POLICY_KINDS:
            raise ValueError(f"unknown exit policy {self.kind!r}; known: {', '.join(POLICY_KINDS)}")
        return pb.ExitPolicy(kind=POLICY_KINDS[self.kind], threshold=float(self.threshold))


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0        # nucleus mass kept; 1 = all
    seed: int = 0             # the draw at position p depends only on (seed, p) and the logits

    def to_pb(self) -> "pb.Sampling":
        return pb.Sampling(temperature=float(self.temperature), top_p=float(self.top_p), seed=int(self.seed))


@dataclass
class StepResult:
    token: int                 # sampled token id (for the position after the last one sent)
    exit: int                  # exit index that produced it
    tier: str                  # tier that holds that exit
    degraded: bool = False     # a deeper tier failed; answered from a shallower exit
    reason: str = ""           # why degraded ("" otherwise)
    timings: dict[str, float] = field(default_factory=dict)  # ms: "device", "edge", "net:device->edge", "total"
    confidence: dict = field(default_factory=dict)  # {"max_prob", "entropy", "margin", "exit", "checked": [...]}

    @classmethod
    def from_pb(cls, r: "pb.ForwardReply") -> "StepResult":
        timings = {t.tier: t.compute_ms for t in r.tiers}
        timings.update({f"net:{h.src}->{h.dst}": h.net_ms for h in r.hops})
        timings["total"] = r.total_ms
        checked = [{"exit": c.exit, "max_prob": c.max_prob, "entropy": c.entropy, "margin": c.margin}
                   for c in r.confidence]
        conf = dict(checked[-1]) if checked else {}
        conf["checked"] = checked
        return cls(token=int(r.token), exit=int(r.exit), tier=r.tier, degraded=r.degraded, reason=r.reason,
                   timings=timings, confidence=conf)


def _read(x) -> bytes | None:
    if x is None or isinstance(x, bytes):
        return x
    return Path(x).read_bytes()


@dataclass
class TLSConfig:
    """PEM bytes or paths. Server: cert+key (+ca to verify clients). Client: ca (+cert+key for mTLS)."""
    ca: bytes | str | Path | None = None
    cert: bytes | str | Path | None = None
    key: bytes | str | Path | None = None
    server_name: str | None = None   # override the name checked against the server certificate

    def channel_credentials(self):
        import grpc
        return grpc.ssl_channel_credentials(root_certificates=_read(self.ca), private_key=_read(self.key),
                                            certificate_chain=_read(self.cert))

    def server_credentials(self, require_client_cert: bool = False):
        import grpc
        if self.cert is None or self.key is None:
            raise ValueError("a TLS server needs --tls-cert and --tls-key")
        if require_client_cert and self.ca is None:
            raise ValueError("--require-client-cert needs --tls-ca to verify clients against")
        return grpc.ssl_server_credentials([(_read(self.key), _read(self.cert))], root_certificates=_read(self.ca),
                                           require_client_auth=require_client_cert)
