"""Chat messages -> the prompt text the model was trained on, through its jinja chat template.

A chat template is code that came with a download. It is rendered the way transformers'
`apply_chat_template` renders it (same sandboxed environment, same globals: `raise_exception`,
`strftime_now`, `tojson`, `bos_token` / `eos_token`, `add_generation_prompt`), so the prompt is
token for token what the model saw in training; and before that it is read once for what a
template has no reason to do (dunder attributes, `include` / `import` / `extends`), which is
refused with the construct named, instead of trusting the sandbox alone.

Where the template comes from: `--chat-template FILE`, else the model's own (tokenizer_config.json
`chat_template`, chat_template.jinja, or a GGUF's `tokenizer.chat_template`, which `rlx compile`
carries into the artifact), else Gemma's turn format (`GEMMA_TEMPLATE`, Gemma 3's own template).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes as nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rlx.errors import RlxError

# Gemma 3's chat template (its tokenizer_config.json): a system message becomes the first user
# turn's prefix; the assistant role is spelled "model".
GEMMA_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

_UNSAFE_HINT = "use the model's own template, or a template that only formats the messages"


class TemplateError(RlxError):
    """A chat template cannot be used, or cannot render these messages."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' tojson: plain json.dumps (jinja's own escapes HTML characters)."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_FORBIDDEN_NODES: dict[type, str] = {nodes.Include: "include", nodes.Import: "import",
                                     nodes.FromImport: "from ... import", nodes.Extends: "extends"}


def _unsafe_constructs(tree: nodes.Template) -> list[str]:
    """What the template reaches for beyond formatting: private or dunder attributes (the way out
    of the sandbox to Python internals) and other templates or files."""
    found: list[str] = []
    for node in tree.find_all(nodes.Node):
        if type(node) in _FORBIDDEN_NODES:
            found.append(f"{{% {_FORBIDDEN_NODES[type(node)]} %}}")
        elif isinstance(node, nodes.Getattr) and node.attr.startswith("_"):
            found.append(f".{node.attr}")
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) \
                and isinstance(node.arg.value, str) and node.arg.value.startswith("_"):
            found.append(f"[{node.arg.value!r}]")
        elif isinstance(node, nodes.NSRef) and node.attr.startswith("_"):
            found.append(f"set .{node.attr}")
        elif isinstance(node, nodes.Filter) and node.name == "attr" and not (
                len(node.args) == 1 and isinstance(node.args[0], nodes.Const)
                and isinstance(node.args[0].value, str) and not node.args[0].value.startswith("_")):
            found.append("|attr(...)")
    return found


class ChatTemplate:
    """A compiled chat template plus the special tokens it may name."""

    def __init__(self, source: str, *, origin: str, special_tokens: Mapping[str, str | None] | None = None) -> None:
        env = _environment()
        try:
            tree = env.parse(source)
        except jinja2.exceptions.TemplateSyntaxError as err:
            raise TemplateError(f"chat template {origin} is not valid jinja (line {err.lineno}: {err.message})",
                                hint="fix the template, or drop --chat-template to use the model's own") from None
        unsafe = _unsafe_constructs(tree)
        if unsafe:
            raise TemplateError(f"chat template {origin} is refused: it uses {', '.join(sorted(set(unsafe)))}, "
                                "which reach outside the messages (Python internals or files)", hint=_UNSAFE_HINT)
        self.source = source
        self.origin = origin
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self._template = env.from_string(source)

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
               **extra: Any) -> str:
        """The prompt text. A template that refuses a system message (Gemma 2's raises) gets it
        folded into the first user turn instead of failing the request."""
        chat = [dict(m) for m in messages]
        try:
            return self._render(chat, add_generation_prompt, extra)
        except TemplateError:
            if not chat or chat[0].get("role") != "system":
                raise
        return self._render(fold_system(chat), add_generation_prompt, extra)

    def _render(self, chat: list[dict[str, Any]], add_generation_prompt: bool, extra: Mapping[str, Any]) -> str:
        context = {**self.special_tokens, **extra}
        try:
            return self._template.render(messages=chat, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **context)
        except jinja2.exceptions.SecurityError as err:
            raise TemplateError(f"chat template {self.origin} was stopped by the sandbox: {err}",
                                hint=_UNSAFE_HINT) from None
        except jinja2.exceptions.TemplateError as err:
            raise TemplateError(f"the chat template cannot render these messages: {err}",
                                hint="messages must alternate user / assistant after an optional system message") \
                from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as err:
            raise TemplateError(f"the chat template failed on these messages ({type(err).__name__}: {err})",
                                hint="check each message has a role and a text content") from None


def fold_system(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A leading system message joined to the first user turn ("SYSTEM\\n\\nUSER"), as Gemma 3's
    template itself places it."""
    system, rest = chat[0], chat[1:]
    text = str(system.get("content", ""))
    if rest and rest[0].get("role") == "user":
        return [{**rest[0], "content": f"{text}\n\n{rest[0].get('content', '')}"}, *rest[1:]]
    return [{"role": "user", "content": text}, *rest]


def load_chat_template(path: str | Path | None, model_template: str | None,
                       special_tokens: Mapping[str, str | None]) -> ChatTemplate:
    """The template to serve with: the file given, else the model's, else Gemma's turn format."""
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise TemplateError(f"--chat-template {path} cannot be read ({err})",
                                hint="pass a jinja template file, e.g. chat_template.jinja") from None
        return ChatTemplate(text, origin=str(path), special_tokens=special_tokens)
    if model_template:
        return ChatTemplate(model_template, origin="from the model", special_tokens=special_tokens)
    return ChatTemplate(GEMMA_TEMPLATE, origin="gemma (default)", special_tokens=special_tokens)
