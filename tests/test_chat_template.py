"""Train/serve parity through the model's own chat template: what any consumer of the merged model or its GGUF
renders (Jinja, as Hugging Face and llama.cpp apply it) is the prompt Axolotl trained on, byte for byte.

The training side (ALPACA.render == what Axolotl tokenizes) is tests/test_prompt_format.py; llama-server's own Jinja
engine rendering the GGUF's template is checked in tests/test_e2e.py through the deploy stage.
"""

import json

import pytest

from tutor_wrap.data.alpaca import ALPACA, AlpacaRow
from tutor_wrap.data.chat_templates import CHAT_TEMPLATES
from tutor_wrap.data.formats import FORMATS
from tutor_wrap.models.files import write_chat_template

pytestmark = pytest.mark.tools

ROWS = [
    {"instruction": "Explain Python lists.", "input": ""},
    {"instruction": "What does this error mean?", "input": "TypeError: can only concatenate str (not \"int\") to str"},
    {"instruction": "Unicode: café ✓ and 'quotes' \"too\"", "input": ""},
    {"instruction": "Go and Jinja syntax stay text: {{ .Prompt }} {% if x %} {{ messages }}", "input": "{# not a comment #}"},
    {"instruction": "Two\nlines\n\nand a blank one", "input": "line 1\nline 2"},
]
IDS = ["no-input", "with-input", "unicode", "template-syntax", "newlines"]


def hf_render(template: str, messages: list[dict], **extra) -> str:
    """Jinja as transformers' apply_chat_template configures it (sandboxed, trim_blocks, lstrip_blocks)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token="<s>",
                                            eos_token="</s>", **extra)


def Row(d: dict) -> AlpacaRow:
    return AlpacaRow(1, d["instruction"], d["input"], "")


@pytest.mark.parametrize("row", ROWS, ids=IDS)
def test_alpaca_template_renders_the_training_prompt(row):
    r = Row(row)
    assert hf_render(ALPACA.chat_template, ALPACA.messages(r)) == ALPACA.prompt(r)


def test_alpaca_template_default_system_and_no_bos():
    # A client that sends only the user turn still gets the training preamble (the no-input one).
    assert hf_render(ALPACA.chat_template, [{"role": "user", "content": "Hi"}]) == ALPACA.render("Hi")
    # BOS comes from the tokenizer (add_bos_token), never from the template: no double BOS.
    assert "bos_token" not in ALPACA.chat_template


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("template", list(CHAT_TEMPLATES))
def test_every_format_has_a_chat_template(name, template):
    fmt = FORMATS[name](CHAT_TEMPLATES[template])
    assert fmt.chat_template and "messages" in fmt.chat_template


def test_transformers_applies_the_written_template_exactly(tiny_model, tmp_path):
    """The merged model folder carries the template: transformers' own apply_chat_template gives the prompt."""
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").write_text("{{ 'a stale template' }}")
    write_chat_template(model, ALPACA.chat_template)
    assert json.loads((model / "tokenizer_config.json").read_text())["chat_template"] == ALPACA.chat_template
    assert (model / "chat_template.jinja").read_text() == ALPACA.chat_template
    tok = AutoTokenizer.from_pretrained(model)
    for row in ROWS:
        r = Row(row)
        text = tok.apply_chat_template(ALPACA.messages(r), tokenize=False, add_generation_prompt=True)
        assert text == ALPACA.prompt(r)
