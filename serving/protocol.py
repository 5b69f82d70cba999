"""Pydantic models of the HTTP API: OpenAI's completions / chat completions schema plus our extensions.

Fields follow OpenAI's order. Everything Familial adds sits in one block marked "Familial extensions"
in each model, so a reader can see at a glance what the `openai` client sends and what it does not
know about (it keeps unknown response fields in `model_extra`, and sends ours through `extra_body`).
Only the parameters we honour are modelled; unknown request fields are ignored (as vLLM does) except
`n`, which must be 1. Every client mistake fails validation here, so it becomes a 400 rather than a
5xx further in: numbers must be finite and in range (`seed` fits the wire's uint64), every string must be
valid Unicode (no lone surrogates), chat content parts must be text parts with string `text`.
This file holds no logic beyond field validation.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

MAX_SEED = 2**64 - 1                 # the relay carries the seed as uint64
MAX_BUDGET_MS = 86_400_000.0         # one day; larger budgets would overflow deadline arithmetic downstream


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


def check_unicode(v):
    """`v` (a string, or lists/dicts of them) unchanged, or ValueError if a string cannot be UTF-8
    encoded: a JSON escape such as "\\ud800" decodes to a lone surrogate, which no tokenizer or response
    can carry."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text must be valid Unicode; found a lone surrogate at character {e.start}") from None
    elif isinstance(v, (list, tuple)):
        for x in v:
            check_unicode(x)
    elif isinstance(v, dict):
        for k, x in v.items():
            check_unicode(k)
            check_unicode(x)
    return v


class OpenAIRequest(OpenAIModel):
    """Base of everything a client sends: every field's strings must be valid Unicode."""

    @field_validator("*")
    @classmethod
    def _valid_unicode(cls, v):
        return check_unicode(v)


# ---- errors ---------------------------------------------------------------------------------------

class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


# ---- shared pieces --------------------------------------------------------------------------------

class StreamOptions(OpenAIRequest):
    include_usage: Optional[bool] = False


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


ExitChoice = Union[int, str]  # "auto" | exit index | tier name


class SpeculativeOptions(OpenAIRequest):
    """`speculative`: the head tier drafts with a shallow exit, the chosen exit verifies k drafts per round
    trip (greedy: the same tokens as without it; sampled: the same distribution). `true` = all defaults;
    `"auto"` (or `mode: "auto"`) = the router speculates only where plain decoding of the exit it would
    choose does not fit the latency budget and speculation does."""
    mode: Literal["on", "auto"] = "on"             # "on": always (at exits deeper than the draft exit)
    draft_exit: Optional[int] = Field(None, ge=0)  # default: the head tier's deepest exit
    k: int = Field(4, ge=1, le=64)                 # drafts per round (the cap when adaptive)
    adaptive: bool = True                          # choose k per round from acceptance and round-trip time


# OpenAI request fields this server does not implement, and the values that ask for nothing (a client
# may send those): any other value is a 400 naming the field, never silently ignored.
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
               "suffix": (None, ""), "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
               "tool_choice": (None, "none", "auto"), "function_call": (None, "none", "auto"),
               "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
               "response_format": (None, {"type": "text"})}


# the unsupported fields, declared (as Any, default null) only so that their validator below runs
_Unsupported = create_model("_Unsupported", __base__=OpenAIRequest, **{k: (Any, None) for k in UNSUPPORTED})


class _SamplingFields(_Unsupported):
    """Validation shared by both request kinds (the fields themselves are declared in OpenAI order)."""

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _unsupported(cls, v, info):
        if not any(v == inert for inert in UNSUPPORTED[info.field_name]):
            allowed = ", ".join(json.dumps(x) for x in UNSUPPORTED[info.field_name])
            raise ValueError(f"not supported by this server (send {allowed} or leave it out)")
        return v

    @field_validator("n", check_fields=False)
    @classmethod
    def _only_n1(cls, v):
        if v is not None and v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop", check_fields=False)
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return []
        v = [v] if isinstance(v, str) else list(v)
        if len(v) > 4 or any(not s for s in v):
            raise ValueError("stop takes up to 4 non-empty strings")
        return v


# ---- /v1/completions ------------------------------------------------------------------------------

class CompletionRequest(_SamplingFields):
    model: Optional[str] = None
    prompt: Union[str, list[str], list[int]]
    max_tokens: Optional[int] = Field(16, ge=1)
    n: Optional[int] = 1
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    stop: Optional[Union[str, list[str]]] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: Optional[float] = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)  # float64, passed on unrounded
    user: Optional[str] = None
    # ---- Familial extensions (not in the OpenAI schema) ----
    latency_budget_ms: Optional[float] = Field(None, gt=0, le=MAX_BUDGET_MS, allow_inf_nan=False)  # arrival to last token
    exit: ExitChoice = "auto"                               # "auto" | exit index | tier name
    ignore_eos: bool = False                                # keep going past end-of-sequence (as vLLM's)
    speculative: Optional[Union[bool, Literal["auto"], SpeculativeOptions]] = None  # draft at the head, verify at the exit

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported")
            return v[0]
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v


# ---- /v1/chat/completions -------------------------------------------------------------------------

class ChatContentPart(OpenAIRequest):
    """One part of a message's content list; only text parts are read (the models take text only)."""
    type: str
    text: Optional[str] = None


class ChatMessage(OpenAIRequest):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ChatContentPart]]

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v):
        """One clear error per bad part (pydantic's union errors would name both branches)."""
        if isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError("content must be a string or a list of text parts")
        parts = []
        for i, p in enumerate(v):
            if not isinstance(p, dict) or p.get("type") != "text":
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise ValueError(f"part {i}: only {{'type': 'text', 'text': ...}} parts are supported, got {kind!r}")
            if not isinstance(p.get("text"), str):
                raise ValueError(f"part {i}: 'text' must be a string, got {type(p.get('text')).__name__}")
            parts.append(ChatContentPart.model_validate(p))
        return parts

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    model: Optional[str] = None
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    n: Optional[int] = 1
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)
    stop: Optional[Union[str, list[str]]] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: Optional[float] = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)  # float64, passed on unrounded
    user: Optional[str] = None
    # ---- Familial extensions (not in the OpenAI schema) ----
    latency_budget_ms: Optional[float] = Field(None, gt=0, le=MAX_BUDGET_MS, allow_inf_nan=False)
    exit: ExitChoice = "auto"
    ignore_eos: bool = False
    speculative: Optional[Union[bool, Literal["auto"], SpeculativeOptions]] = None


# ---- Familial extension object on responses -------------------------------------------------------

class LatencySplit(OpenAIModel):
    """Milliseconds, summed over the request's steps. `network` = hops between tiers + router<->head.
    Every other key is a tier's own time under the tier's name (whatever the chain calls its tiers)."""
    model_config = ConfigDict(extra="allow")
    queue: float = 0.0
    network: float = 0.0
    total: float = 0.0


class ReplanInfo(OpenAIModel):
    """A step-down to a shallower exit mid-request, as the response reports it (built from the engine's
    `serving.engine.Replan` in `request_run.RequestRun._record`)."""
    at_token: int          # index of the first completion token produced by the new exit
    from_exit: int
    to_exit: int
    reason: str


class FamilialInfo(OpenAIModel):
    """`choice.familial`: which exit and tier produced each token (of this chunk, when streaming).

    The summary fields are filled on non-streaming choices and on the streamed chunk that carries
    `finish_reason`.
    """
    exits: list[int] = []
    tiers: list[str] = []
    exit_requested: Optional[ExitChoice] = None
    latency_budget_ms: Optional[float] = None
    budget_met: Optional[bool] = None
    predicted_ms: Optional[float] = None  # the router's prediction for the exit it chose at admission
    infeasible: Optional[bool] = None     # no exit was predicted to fit the budget; answered from the shallowest
    replans: Optional[list[ReplanInfo]] = None
    degraded: Optional[bool] = None       # a tier failed; some tokens came from a shallower exit than asked
    degraded_reasons: Optional[list[str]] = None
    latency_ms: Optional[LatencySplit] = None
    # speculative requests only, one entry per token like `exits`: an accepted draft or not, and on the
    # token that closes a round the drafts checked in it and how many were accepted (0 elsewhere)
    draft: Optional[list[bool]] = None
    drafted: Optional[list[int]] = None
    accepted: Optional[list[int]] = None
    speculative: Optional["SpeculativeSummary"] = None    # summary fields: the whole request's totals


class SpeculativeSummary(OpenAIModel):
    drafted: int
    accepted: int
    rounds: int
    acceptance: Optional[float] = None   # accepted / drafted
    planned: Optional[bool] = None       # the admission plan speculates (false: "auto" found plain decoding fits)
    predicted_tokens_per_round: Optional[float] = None  # the plan's expected tokens per round


# ---- responses ------------------------------------------------------------------------------------

# "stop": end of sequence or a stop string; "length": max_tokens; "error": the stream was cut short
# because the engine failed mid-request (the text so far is kept; `familial.degraded_reasons` says why).
FinishReason = Literal["stop", "length", "error"]


class CompletionChoice(OpenAIModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Optional[FinishReason] = None
    # ---- Familial extensions ----
    familial: Optional[FamilialInfo] = None


class CompletionResponse(OpenAIModel):
    id: str = Field(default_factory=lambda: random_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class ChatResponseMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None


class ChatCompletionChoice(OpenAIModel):
    index: int = 0
    message: ChatResponseMessage
    logprobs: None = None
    finish_reason: Optional[FinishReason] = None
    # ---- Familial extensions ----
    familial: Optional[FamilialInfo] = None


class ChatCompletionResponse(OpenAIModel):
    id: str = Field(default_factory=lambda: random_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: Optional[UsageInfo] = None


class DeltaMessage(OpenAIModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatCompletionChunkChoice(OpenAIModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: None = None
    finish_reason: Optional[FinishReason] = None
    # ---- Familial extensions ----
    familial: Optional[FamilialInfo] = None


class ChatCompletionChunk(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]
    usage: Optional[UsageInfo] = None


# Streamed completions reuse CompletionResponse (OpenAI streams "text_completion" objects too).


# ---- /v1/models -----------------------------------------------------------------------------------

class ExitCard(OpenAIModel):
    index: int
    layer: int
    tier: str
    val_loss: Optional[float] = None


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "familial"
    # ---- Familial extensions ----
    exits: list[ExitCard] = []
    tiers: list[str] = []


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
