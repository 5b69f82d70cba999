"""Prometheus metrics of the HTTP face, one registry per app (so tests can run several apps at once).

Names follow vLLM's where one exists (TTFT, time per output token, e2e latency). Latencies are in
seconds, as Prometheus expects. This file only defines and renders metrics; handlers record them.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LAT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TPOT = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)
_DECISION = (1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("familial_requests", "HTTP generation requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.running = Gauge("familial_requests_running", "Requests generating now", registry=r)
        self.waiting = Gauge("familial_requests_waiting", "Requests queued for a generation slot", registry=r)
        self.ttft = Histogram("familial_time_to_first_token_seconds", "Arrival to first token", buckets=_LAT, registry=r)
        self.tpot = Histogram("familial_time_per_output_token_seconds", "Gap between consecutive tokens",
                              buckets=_TPOT, registry=r)
        self.e2e = Histogram("familial_e2e_request_latency_seconds", "Arrival to last token", buckets=_LAT, registry=r)
        self.queue = Histogram("familial_queue_time_seconds", "Time waiting for a generation slot", buckets=_LAT,
                               registry=r)
        self.prompt_tokens = Counter("familial_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("familial_generation_tokens", "Completion tokens produced", registry=r)
        self.tokens_by_exit = Counter("familial_tokens_by_exit", "Completion tokens by the exit and tier that made them",
                                      ["exit", "tier"], registry=r)
        self.budget_requests = Counter("familial_budget_requests", "Requests that carried a latency budget", registry=r)
        self.budget_misses = Counter("familial_budget_misses", "Requests that finished after their latency budget",
                                     registry=r)
        self.infeasible = Counter("familial_budget_infeasible", "Requests whose budget no exit was predicted to meet",
                                  registry=r)
        self.replans = Counter("familial_replans", "Step-downs to a shallower exit during generation", registry=r)
        self.degraded = Counter("familial_degraded_replies", "Replies with a token from a degraded (failed-over) step",
                                registry=r)
        self.decision = Histogram("familial_router_decision_seconds", "Router time to choose an exit",
                                  buckets=_DECISION, registry=r)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
