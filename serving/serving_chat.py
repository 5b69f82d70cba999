"""POST /v1/chat/completions: messages in, one assistant message out, whole or as SSE chunks.

A model that ships a chat template (a Hugging Face tokenizer, `trunk.tokenizer.HFTokenizer`) gets its
own template, rendered by the tokenizer; a conversation the template refuses is a 400. Otherwise (the
built-in tokenizers have no chat tokens) the template is plain text: each message becomes one line
`"<Role>: <content>\n"` with Role in System / User / Assistant (a "developer" message counts as
System), and the prompt ends with `"Assistant:"`. Generation also stops at `"\nUser:"` so the model does
not write the next user turn. `chat_prompt` is the one place that chooses.
"""
from __future__ import annotations

import asyncio
import time

from serving.encoding import dump
from serving.errors import APIError
from serving.protocol import (ChatCompletionChoice, ChatCompletionChunk, ChatCompletionChunkChoice,
                              ChatCompletionRequest, ChatCompletionResponse, ChatMessage, ChatResponseMessage,
                              DeltaMessage, FamilialInfo, random_id)
from serving.request_run import RequestRun
from serving.serving_base import OpenAIServing
from serving.validation import build_request, check_model, encode_prompt

ROLE_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\nUser:"


def render_chat(messages: list[ChatMessage]) -> str:
    lines = [f"{ROLE_NAMES[m.role]}: {m.text()}\n" for m in messages]
    return "".join(lines) + "Assistant:"


def chat_prompt(tokenizer, messages: list[ChatMessage]) -> tuple[list[int], list[str]]:
    """(prompt token ids, stop strings the template implies)."""
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer.encode(render_chat(messages)), [CHAT_STOP]
    msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
    try:
        return tokenizer.apply_chat_template(msgs), []
    except ValueError as e:  # TokenizerError: the template refused the conversation
        raise APIError(400, str(e), param="messages") from None


class OpenAIServingChat(OpenAIServing):
    endpoint = "chat.completions"

    async def create(self, req: ChatCompletionRequest, arrival_s: float, is_disconnected):
        name = check_model(self.settings, self.engine, req.model)
        if getattr(self.engine.tokenizer, "chat_template", None):
            prompt, template_stops = await asyncio.to_thread(chat_prompt, self.engine.tokenizer, req.messages)
        else:
            prompt, template_stops = await encode_prompt(self.engine, self.settings, render_chat(req.messages)), [CHAT_STOP]
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        gen = build_request(self.engine, self.settings, prompt, max_tokens, req, arrival_s)
        run = RequestRun(self.engine, self.metrics, gen, [*(req.stop or []), *template_stops], exit_requested=req.exit)
        stack = await self.start(run)
        if req.stream:
            return self.sse(stack, run, *self._chunkers(run, name, req))
        async with stack:
            text, _ = await self.collect(run, is_disconnected)
        resp = ChatCompletionResponse(model=name, usage=run.usage(), choices=[ChatCompletionChoice(
            message=ChatResponseMessage(content=text), finish_reason=run.finish_reason,
            familial=run.summary(run.exits, run.tiers))])
        return dump(resp)

    def _chunkers(self, run: RequestRun, name: str, req: ChatCompletionRequest):
        rid, created = random_id("chatcmpl"), int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        first = [True]

        def chunk(d):
            last = d.finish_reason is not None
            fam = run.summary(d.exits, d.tiers, d.first) if last else run.tokens_info(d.exits, d.tiers, d.first)
            delta = DeltaMessage(role="assistant" if first[0] else None, content=d.text)
            first[0] = False
            return ChatCompletionChunk(id=rid, created=created, model=name,
                                       usage=run.usage() if last and not include_usage else None,
                                       choices=[ChatCompletionChunkChoice(delta=delta, finish_reason=d.finish_reason,
                                                                          familial=fam)])

        def usage_chunk():
            return ChatCompletionChunk(id=rid, created=created, model=name, choices=[], usage=run.usage())

        return chunk, (usage_chunk if include_usage else None)
