"""Chat templates: render a Hugging Face model's Jinja chat template the way `transformers` does.

A template comes from the model's own files (`chat_template.jinja`, or `chat_template` in
`tokenizer_config.json`, a string or a list of named templates). It runs in jinja2's immutable sandbox
with the same environment `transformers.apply_chat_template` builds (trim_blocks, lstrip_blocks, loop
controls, `raise_exception`, `strftime_now`, a non-escaping `tojson`, a pass-through
`{% generation %}` block), so the text is the same. jinja2 comes with torch. This file renders text
only: tokenizing it is `trunk/tokenizer.py`'s job, and tools, documents and multimodal content parts
are not passed to templates.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache


class ChatTemplateError(ValueError):
    """The template cannot be compiled, or refused the conversation (its `raise_exception`)."""


def pick_template(value, name: str = "default") -> str | None:
    """`chat_template` as stored in tokenizer_config.json: a string, or [{"name", "template"}, ...]."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get(name) or next(iter(named.values()), None)
    raise ChatTemplateError(f"chat_template must be a string or a list of named templates, got {type(value).__name__}")


@lru_cache(maxsize=8)
def _compile(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; here it renders as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template does not compile: {e}") from None


def render_chat(source: str, messages: list[dict], special_tokens: dict[str, str | None],
                add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages` ([{"role", "content"}, ...]); `special_tokens` gives bos_token,
    eos_token, ... as the template expects them."""
    import jinja2

    template = _compile(source)
    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               **{k: v for k, v in special_tokens.items() if v is not None})
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"chat template refused the conversation: {e}") from None
