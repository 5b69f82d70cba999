"""Settings of the HTTP face (limits, auth), one dataclass; the CLI fills it from flags."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeSettings:
    model_name: str | None = None       # id reported by /v1/models and accepted in `model` (None = the engine's)
    api_key: str | None = None          # when set, every /v1 route needs `Authorization: Bearer <key>`
    max_prompt_tokens: int = 2048       # longer prompts are rejected with 400
    max_tokens_limit: int = 1024        # largest `max_tokens` accepted
    default_max_tokens: int = 16        # OpenAI's default for completions; chat uses the same
    max_concurrency: int = 32           # requests generating at once
    max_queue: int = 64                 # requests waiting for a slot; beyond that: 429 + Retry-After
    retry_after_s: int = 1              # Retry-After header on 429
    disconnect_poll_s: float = 0.05     # how often a non-streaming request checks for a gone client
    max_body_bytes: int = 1 << 20       # larger request bodies get 413 (a 2048-token prompt needs well under this)
    body_timeout_s: float = 30.0        # the whole body must arrive this soon after the headers, else 408
