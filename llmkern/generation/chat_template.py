"""Chat templates rendered the way transformers renders them (transformers 5, utils/chat_template_utils.py).

A checkpoint's chat template is untrusted Jinja code from the Hub, so it runs in jinja2's immutable sandbox with
the same environment transformers builds: trim_blocks and lstrip_blocks, the loopcontrols extension, a `tojson`
filter that does not HTML-escape, and the globals `raise_exception`, `strftime_now`, `dict` and `namespace`
(restricted so templates cannot reach Python internals). The `{% generation %}` block that transformers uses to
mark assistant tokens is accepted and renders its body unchanged. Everything the template sees is first rebuilt
out of plain JSON types, as transformers does, so a caller's rich objects never reach the sandbox.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Names a message's reasoning is passed under; templates read the first one (gpt-oss templates read `thinking`).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
# Appended to the final message when continuing it, then cut from the rendered text (transformers' marker).
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body (transformers tracks assistant spans with it)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes '<', '>' and '&', which would change the prompt the model sees.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateDict:
    # Only construction is exposed, so a template cannot reach dict's class attributes through `dict`.
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # Underscore names are refused so a template cannot store or reach CPython internals through a namespace.
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}"
            )


@lru_cache(maxsize=32)
def compile_chat_template(source: str) -> jinja2.Template:
    """The compiled template (cached: a server renders the same template for every request)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env.from_string(source)


def plain_template_data(value: Any) -> Any:
    """`value` rebuilt from plain JSON types (str/int/float/bool/None, dicts, lists, tuples); dataclasses and
    pydantic models become dicts, anything else an inert '<TypeName>' placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # str subclasses (enums...) can carry methods: back to the base type
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_template_data(k): plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain_template_data(v) for v in value)
    if isinstance(value, np.generic):  # numpy scalars: np.bool_(False) would otherwise become a truthy placeholder
        return plain_template_data(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return plain_template_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _normalize_messages(messages) -> list[dict]:
    messages = plain_template_data(list(getattr(messages, "messages", messages)))
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TypeError(f"messages[{i}]: a chat message must be a dict with 'role' and 'content', got {message!r}")
        # OpenAI-style clients send content=None / tool_calls=None; templates handle a missing key, not None.
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_chat_template(
    source: str,
    messages,
    *,
    add_generation_prompt: bool = False,
    continue_final_message: bool | str = False,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    **variables,
) -> str:
    """One conversation rendered by the Jinja template `source`. `variables` are visible to the template (the
    tokenizer passes its special tokens: bos_token, eos_token, ...). `continue_final_message` leaves the last
    message open (no end-of-turn) so the model continues it; True continues its 'content'."""
    messages = _normalize_messages(messages)
    if not messages:
        raise ValueError("messages: cannot apply a chat template to an empty conversation")
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
    if tools is not None:
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise TypeError(f"tools[{i}]: a tool must be a JSON schema dict, got {type(tool).__name__}")
    if documents is not None:
        for i, document in enumerate(documents):
            if not isinstance(document, dict):
                raise TypeError(f"documents[{i}]: a document must be a dict with 'title' and 'text' keys")

    final_text = None
    if continue_final_message:
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        final_text = messages[-1].get(field)
        if final_text is None:
            raise ValueError(f"continue_final_message: the final message has no {field!r} to continue")
        fields = [field]
        if field in _REASONING_FIELDS:  # reasoning is copied under several names: continue every copy
            fields = [f for f in _REASONING_FIELDS if messages[-1].get(f) == final_text]
        if not any(f in source for f in fields):
            raise ValueError(f"continue_final_message: the chat template never reads the field {field!r}")
        if isinstance(final_text, (list, tuple)):  # content blocks: continue the last text block
            block = next((b for b in reversed(final_text) if "text" in b), None)
            if block is None:
                raise ValueError("continue_final_message: the final message has no text block to continue")
            final_text = block["text"]
            block["text"] += _CONTINUE_TAG
        else:
            for f in fields:
                messages[-1][f] += _CONTINUE_TAG

    rendered = compile_chat_template(source).render(
        messages=messages,
        tools=plain_template_data(tools),
        documents=plain_template_data(documents),
        add_generation_prompt=add_generation_prompt,
        **plain_template_data(variables),
    )

    if final_text is not None:
        if final_text.strip() not in rendered or _CONTINUE_TAG.strip() not in rendered:
            raise ValueError(
                "continue_final_message: the final message does not appear in the rendered chat (the template "
                f"changes or drops it); rendered:\n{rendered}"
            )
        at = rendered.rindex(_CONTINUE_TAG.strip())
        # A template that trims the message also trimmed the tag's trailing space: then trim what precedes it too.
        rendered = rendered[:at] if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else rendered[:at].rstrip()
    return rendered
