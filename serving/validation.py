"""Request checks: what an OpenAI request asks for, checked against the engine and the settings, and
turned into the engine's `GenerateRequest` (every refusal a 400 or 404 naming the field).

A prompt too long is refused by its byte count before it is tokenized when its bytes alone prove it
(see `encode_prompt`); tokenizing runs in a worker thread, off the event loop. `exit` is resolved here
("auto", an index or a tier name), through the engine interface, and so is `speculative` (true, "auto"
or options; the draft exit on the head tier). Admission (429) is `admission.py`'s.
"""
from __future__ import annotations

import asyncio
import contextlib
import uuid
import weakref

from relay.work import Speculative
from serving.engine import Engine, GenerateRequest, SamplingParams
from serving.errors import APIError
from serving.protocol import SpeculativeOptions
from serving.settings import ServeSettings

_MAX_TOKEN_BYTES: "weakref.WeakKeyDictionary[object, int]" = weakref.WeakKeyDictionary()
_MIN_TOKEN_BYTES_BOUND = 16  # covers special-token strings ("<|endoftext|>") that `decode` skips


def max_token_bytes(tokenizer) -> int:
    """An upper bound on the UTF-8 bytes of text one token can stand for: the longest decoded token,
    and at least 16 for special-token strings. Computed once per tokenizer (one decode per id)."""
    try:
        return _MAX_TOKEN_BYTES[tokenizer]
    except (KeyError, TypeError):
        pass
    longest = max((len(tokenizer.decode([i]).encode("utf-8")) for i in range(tokenizer.vocab_size)), default=0)
    n = max(longest, _MIN_TOKEN_BYTES_BOUND)
    with contextlib.suppress(TypeError):
        _MAX_TOKEN_BYTES[tokenizer] = n
    return n


def prompt_token_limit(engine: Engine, settings: ServeSettings) -> int:
    return min(settings.max_prompt_tokens, engine.info.max_seq_len - 1)


def _too_long(n_tokens: int, limit: int) -> APIError:
    return APIError(400, f"prompt is {n_tokens} tokens; the limit is {limit}", param="prompt",
                    code="context_length_exceeded")


async def encode_prompt(engine: Engine, settings: ServeSettings, text: str) -> list[int]:
    """Token ids of `text`, tokenized in a worker thread. A text longer than the token limit times the
    most bytes one token can cover has more tokens than the limit for sure, and is refused untokenized."""
    limit = prompt_token_limit(engine, settings)
    nbytes = len(text.encode("utf-8"))
    if nbytes > limit:  # only then can it be too long; the bound costs one pass over the vocabulary
        per_token = await asyncio.to_thread(max_token_bytes, engine.tokenizer)
        if nbytes > limit * per_token:
            raise APIError(400, f"prompt is {nbytes} bytes, more than {limit} tokens can hold (at most "
                                f"{per_token} bytes each); the limit is {limit} tokens", param="prompt",
                           code="context_length_exceeded")
    return await asyncio.to_thread(engine.tokenizer.encode, text)


def resolve_exit(engine: Engine, exit) -> int | None:
    """"auto" -> None (choose by budget); an index; or a tier name -> that tier's best exit."""
    exits = engine.info.exits
    if isinstance(exit, str) and exit.strip().lstrip("-").isdigit():
        exit = int(exit)
    if isinstance(exit, int) and not isinstance(exit, bool):
        if not 0 <= exit < len(exits):
            raise APIError(400, f"exit {exit} out of range: this family has exits 0..{len(exits) - 1}", param="exit")
        return exit
    if exit == "auto":
        return None
    g = engine.exit_on_tier(exit) if isinstance(exit, str) else None
    if g is None:
        raise APIError(400, f"exit must be 'auto', an exit index or a tier name ({', '.join(engine.info.tiers)}); "
                            f"got {exit!r}", param="exit")
    return g


def speculative_options(opt) -> SpeculativeOptions | None:
    """The request's `speculative` field (None, a bool, "auto" or SpeculativeOptions) as options."""
    if opt is None or opt is False:
        return None
    if opt == "auto":
        return SpeculativeOptions(mode="auto")
    return SpeculativeOptions() if opt is True else opt


def speculative_of(opt, engine: Engine) -> Speculative | None:
    """The request's `speculative` field as the engine's option; the draft exit defaults to the head
    tier's deepest and must be held by the head tier (else a 400). Whether the planner decides ("auto")
    is `GenerateRequest.speculative_auto`, set by `build_request`."""
    o = speculative_options(opt)
    if o is None:
        return None
    head = [e.index for e in engine.info.exits if e.tier == engine.info.tiers[0]]
    draft = max(head) if o.draft_exit is None else o.draft_exit
    if draft not in head:
        raise APIError(400, f"speculative.draft_exit must be an exit of the head tier {engine.info.tiers[0]!r} "
                            f"({', '.join(map(str, head))}), got {draft}", param="speculative")
    return Speculative(draft, o.k, o.adaptive)


def check_model(settings: ServeSettings, engine: Engine, model: str | None) -> str:
    name = settings.model_name or engine.info.name
    if model not in (None, "", name):
        raise APIError(404, f"the model '{model}' does not exist; this server serves '{name}'", param="model",
                       code="model_not_found")
    return name


def build_request(engine: Engine, settings: ServeSettings, prompt_ids: list[int], max_tokens: int | None,
                  req, arrival_s: float) -> GenerateRequest:
    """The engine request for prompt `prompt_ids` and the sampling fields of `req` (either endpoint's)."""
    if not prompt_ids:
        raise APIError(400, "prompt must not be empty", param="prompt")
    limit = prompt_token_limit(engine, settings)
    if len(prompt_ids) > limit:
        raise _too_long(len(prompt_ids), limit)
    vocab = engine.tokenizer.vocab_size
    if any((not isinstance(t, int)) or not 0 <= t < vocab for t in prompt_ids):
        raise APIError(400, f"token ids in prompt must be integers in [0, {vocab})", param="prompt")
    n = settings.default_max_tokens if max_tokens is None else max_tokens
    if n > settings.max_tokens_limit:
        raise APIError(400, f"max_tokens is {n}; the limit is {settings.max_tokens_limit}", param="max_tokens")
    if len(prompt_ids) + n > engine.info.max_seq_len:
        raise APIError(400, f"prompt ({len(prompt_ids)}) + max_tokens ({n}) exceeds the context length "
                            f"{engine.info.max_seq_len}", param="max_tokens", code="context_length_exceeded")
    seed = req.seed if req.seed is not None else uuid.uuid4().int & 0x7FFFFFFF
    spec = speculative_options(req.speculative)
    return GenerateRequest(request_id=uuid.uuid4().hex, prompt_ids=list(prompt_ids), max_tokens=n,
                           sampling=SamplingParams(req.temperature if req.temperature is not None else 1.0,
                                                   req.top_p if req.top_p is not None else 1.0, seed),
                           exit=resolve_exit(engine, req.exit), budget_ms=req.latency_budget_ms, arrival_s=arrival_s,
                           ignore_eos=req.ignore_eos, speculative=speculative_of(spec, engine),
                           speculative_auto=spec is not None and spec.mode == "auto")
