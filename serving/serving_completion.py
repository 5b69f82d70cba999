"""POST /v1/completions: prompt (text or token ids) in, text out, whole or as SSE chunks.

Shapes responses only: request checks are `validation.py`'s, admission and delivery (whole or SSE)
`serving_base.py`'s, generation and detokenisation `request_run.py`'s and `detokenize.py`'s.
"""
from __future__ import annotations

import time

from serving.encoding import dump
from serving.protocol import CompletionChoice, CompletionRequest, CompletionResponse, FamilialInfo, random_id
from serving.request_run import RequestRun
from serving.serving_base import OpenAIServing
from serving.validation import build_request, check_model, encode_prompt


class OpenAIServingCompletion(OpenAIServing):
    endpoint = "completions"

    async def create(self, req: CompletionRequest, arrival_s: float, is_disconnected):
        """A response dict, or an async iterator of SSE lines when `req.stream`."""
        name = check_model(self.settings, self.engine, req.model)
        prompt = (await encode_prompt(self.engine, self.settings, req.prompt) if isinstance(req.prompt, str)
                  else list(req.prompt))
        gen = build_request(self.engine, self.settings, prompt, req.max_tokens, req, arrival_s)
        run = RequestRun(self.engine, self.metrics, gen, req.stop or [], exit_requested=req.exit)
        stack = await self.start(run)
        if req.stream:
            return self.sse(stack, run, *self._chunkers(run, name, req))
        async with stack:
            text, _ = await self.collect(run, is_disconnected)
        resp = CompletionResponse(model=name, usage=run.usage(), choices=[CompletionChoice(
            text=text, finish_reason=run.finish_reason, familial=run.summary(run.exits, run.tiers))])
        return dump(resp)

    def _chunkers(self, run: RequestRun, name: str, req: CompletionRequest):
        rid, created = random_id("cmpl"), int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(d):
            last = d.finish_reason is not None
            fam = run.summary(d.exits, d.tiers, d.first) if last else run.tokens_info(d.exits, d.tiers, d.first)
            return CompletionResponse(id=rid, created=created, model=name,
                                      usage=run.usage() if last and not include_usage else None,
                                      choices=[CompletionChoice(text=d.text, finish_reason=d.finish_reason,
                                                                familial=fam)])

        def usage_chunk():
            return CompletionResponse(id=rid, created=created, model=name, choices=[], usage=run.usage())

        return chunk, (usage_chunk if include_usage else None)
