"""Chat templates render as transformers' apply_chat_template does (text and ids), a system message
on a template that refuses one is folded, a malicious template is refused, the model's own
template travels through a GGUF and an artifact's tokenizer files."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlx.frontends.checkpoint import open_checkpoint
from rlx.runtime.tokenizer import Tokenizer
from rlx.serve.chat_template import GEMMA_TEMPLATE, ChatTemplate, TemplateError, load_chat_template
from tests.fixtures.gguf_writer import write_gguf_from_hf

# google/gemma-2-*-it's template: no system role
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
# a ChatML-style template using namespace, loop controls, tojson and eos_token
CHATML_TEMPLATE = (
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m['role'] == 'tool' %}{% continue %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% else %}{{ eos_token }}{% endif %}"
    "{{ {'turns': ns.n} | tojson }}"
)

CHATS = {
    "one turn": [{"role": "user", "content": "hello world"}],
    "multi-turn": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": " the world "},
                   {"role": "user", "content": "HW!\n\nhello"}],
    "system": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
               {"role": "assistant", "content": "world"}, {"role": "user", "content": "the"}],
}


@pytest.fixture(scope="module")
def tiny_gguf(tiny_ckpt, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("chat-gguf") / "tiny.gguf"
    return write_gguf_from_hf(tiny_ckpt("gemma3"), out, chat_template=GEMMA_TEMPLATE)


@pytest.fixture(scope="module")
def tokenizers(tiny_gguf: Path) -> tuple[Tokenizer, object]:
    import transformers

    ours = Tokenizer.from_checkpoint(open_checkpoint(tiny_gguf))
    theirs = transformers.AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    return ours, theirs


def _ours(tok: Tokenizer, source: str) -> ChatTemplate:
    bos = tok.backend.id_to_token(tok.bos_id)
    return ChatTemplate(source, origin="test", special_tokens={"bos_token": bos, "eos_token": "<eos>"})


@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("chat", list(CHATS))
@pytest.mark.parametrize("template", ["gemma3", "gemma2", "chatml"])
def test_render_equals_transformers(tokenizers, template: str, chat: str, generation_prompt: bool) -> None:
    ours, theirs = tokenizers
    source = {"gemma3": GEMMA_TEMPLATE, "gemma2": GEMMA2_TEMPLATE, "chatml": CHATML_TEMPLATE}[template]
    messages = CHATS[chat]
    expected_messages = messages
    if template == "gemma2" and chat == "system":
        with pytest.raises(Exception, match="System role not supported"):
            theirs.apply_chat_template(messages, chat_template=source, tokenize=False)
        # folded the way Gemma 3's template places it: the first user turn's prefix
        expected_messages = [{"role": "user", "content": "be brief\n\nhello"}, *messages[2:]]
    text = theirs.apply_chat_template(expected_messages, chat_template=source, tokenize=False,
                                      add_generation_prompt=generation_prompt)
    ids = theirs.apply_chat_template(expected_messages, chat_template=source, tokenize=True,
                                     add_generation_prompt=generation_prompt, return_dict=False)
    rendered = _ours(ours, source).render(messages, add_generation_prompt=generation_prompt)
    assert rendered == text
    assert ours.encode(rendered, add_bos=False) == list(ids)


def test_model_template_read_from_gguf_and_carried_by_the_artifact_tokenizer(tokenizers, tmp_path: Path) -> None:
    ours, theirs = tokenizers
    assert ours.chat_template == GEMMA_TEMPLATE == theirs.chat_template
    ours.save(tmp_path)  # what `rlx compile` writes into the artifact (compile.py's _save_tokenizer)
    assert Tokenizer.from_hf_dir(tmp_path).chat_template == GEMMA_TEMPLATE


def test_hf_dir_chat_template_jinja_file(tokenizers, tmp_path: Path) -> None:
    ours, _ = tokenizers
    plain = Tokenizer(ours.backend, bos_id=ours.bos_id, eos_ids=ours.eos_ids, source="test")
    plain.save(tmp_path)
    assert Tokenizer.from_hf_dir(tmp_path).chat_template is None
    (tmp_path / "chat_template.jinja").write_text(GEMMA2_TEMPLATE)
    assert Tokenizer.from_hf_dir(tmp_path).chat_template == GEMMA2_TEMPLATE


def test_template_precedence(tmp_path: Path) -> None:
    special = {"bos_token": "<bos>"}
    assert load_chat_template(None, None, special).source == GEMMA_TEMPLATE
    assert load_chat_template(None, GEMMA2_TEMPLATE, special).source == GEMMA2_TEMPLATE
    file = tmp_path / "t.jinja"
    file.write_text(CHATML_TEMPLATE)
    assert load_chat_template(file, GEMMA2_TEMPLATE, special).source == CHATML_TEMPLATE
    with pytest.raises(TemplateError, match="cannot be read"):
        load_chat_template(tmp_path / "missing.jinja", None, special)


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__ }}",
    "{{ messages['__class__'] }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ x | attr('__class__') }}",
    "{% include '/etc/passwd' %}",
    "{% import '/etc/passwd' as p %}",
    "{% extends '/etc/passwd' %}",
    "{% set ns = namespace() %}{% set ns.__dict__ = 1 %}",
])
def test_malicious_template_refused(source: str) -> None:
    with pytest.raises(TemplateError, match="refused"):
        ChatTemplate(source, origin="evil.jinja")


def test_sandbox_still_stops_what_the_static_check_cannot_see() -> None:
    """A dunder name built at run time gets past the reading, not past the sandbox."""
    template = ChatTemplate("{% set k = messages[1]['content'] %}{{ 'x'[k][k] }}", origin="sneaky")
    with pytest.raises(TemplateError, match="sandbox"):
        template.render([{"role": "user", "content": "x"}, {"role": "user", "content": "__class__"}])


def test_bad_syntax_and_bad_roles_are_template_errors() -> None:
    with pytest.raises(TemplateError, match="not valid jinja"):
        ChatTemplate("{% for %}", origin="broken")
    template = ChatTemplate(GEMMA_TEMPLATE, origin="gemma", special_tokens={"bos_token": "<bos>"})
    with pytest.raises(TemplateError, match="alternate"):
        template.render([{"role": "assistant", "content": "x"}])
