"""Train/serve parity: what Ollama renders from our TEMPLATE is, byte for byte, the prompt Axolotl trained on.

Serving side: tests/go/render_template.go, built once per session with `go build`, renders a TEMPLATE with Go's
text/template exactly as Ollama's template package does (github.com/ollama/ollama template/template.go at
fb30760996871fa9460115c753afd2c60d4ab0f7): either on given values (.System/.Prompt/.Response, or .Messages/.System)
or from a request's messages through Ollama's Execute (collate, the .Messages path, or the legacy per-turn path
that cuts the last turn after {{ .Response }}).

Training side: the prompt part of Axolotl 0.19's own tokenization of the row (the tiny Llama tokenizer from
tests/tiny_model.py; for chat templates a copy with the template's special tokens added), decoded.

  alpaca: AlpacaPromptTokenizingStrategy(AlpacaPrompter("instruct")): the tokens labelled -100, decoded with
    skip_special_tokens=True (drops the BOS, which llama.cpp adds itself at serve time).
    Rows with an input: Ollama's single-turn values have only .System and .Prompt, and ALPACA.template is the
    no-input form. Such a row is served as prompt "INSTRUCTION\\n\\n### Input:\\nINPUT" with the with-input
    preamble as the request's system text (ALPACA.serve_fields); that reproduces training exactly. With the
    Modelfile's default SYSTEM instead, only the preamble sentence differs (pinned below).
  chatml / llama3: axolotl.prompt_strategies.chat_template.load(tokenizer, cfg{chat_template: NAME}, ds_cfg
    {type: chat_template}), the strategy training uses; the prompt is every token before the final assistant
    turn's trained span (so it ends with the assistant header), decoded with special tokens kept (they are text
    in the TEMPLATE); llama3's template writes the BOS itself, which is dropped (llama.cpp adds it).

Go is required: without it these tests fail (they never skip). Install: apt-get install -y golang-go
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tutor_wrap.data.alpaca import ALPACA, ALPACA_SYSTEM_NO_INPUT, ALPACA_SYSTEM_WITH_INPUT
from tutor_wrap.data.chat_templates import CHATML, LLAMA3, for_chat_template
from tutor_wrap.data.formats import get as for_dataset

pytestmark = pytest.mark.tools

GO_SOURCE = Path(__file__).resolve().parent / "go" / "render_template.go"
GO_INSTALL = "apt-get update && apt-get install -y golang-go"


class GoRenderer:
    """Builds tests/go/render_template.go on first use (once per session); calling it renders a template."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.binary: Path | None = None

    def _build(self) -> Path:
        go = shutil.which("go")
        if go is None:
            pytest.fail("the train/serve parity tests need the Go toolchain (Ollama renders TEMPLATE with Go's "
                        f"text/template) and `go` is not on PATH: install it with `{GO_INSTALL}`", pytrace=False)
        version = subprocess.run([go, "version"], capture_output=True, text=True, timeout=60).stdout
        m = re.search(r"go(\d+)\.(\d+)", version)
        if m and (int(m.group(1)), int(m.group(2))) < (1, 18):
            # the renderer uses `any`, and text/template's and/or short-circuit as Ollama's does from Go 1.18 on
            pytest.fail(f"the train/serve parity tests need Go 1.18 or newer; `go version` says {version.strip()} "
                        "(Ubuntu 20.04 / Debian 11 ship older ones: use a newer release's golang-go or go.dev/dl)",
                        pytrace=False)
        out = self.workdir / "render_template"
        env = dict(os.environ)
        env.setdefault("GOCACHE", str(self.workdir / "gocache"))
        env.setdefault("GOPATH", str(self.workdir / "gopath"))
        env["GOFLAGS"] = ""
        env["CGO_ENABLED"] = "0"
        r = subprocess.run([go, "build", "-o", str(out), str(GO_SOURCE)], capture_output=True, text=True, env=env,
                           timeout=300)
        if r.returncode != 0:
            pytest.fail(f"go build {GO_SOURCE} failed ({r.returncode}):\n{r.stdout}{r.stderr}", pytrace=False)
        return out

    def __call__(self, template: str, *, data: dict | None = None, messages: list[dict] | None = None,
                 force_legacy: bool = False) -> str:
        if self.binary is None:
            self.binary = self._build()
        req: dict = {"template": template}
        if data is not None:
            req["data"] = data
        else:
            req["messages"] = messages
            req["force_legacy"] = force_legacy
        r = subprocess.run([str(self.binary)], input=json.dumps(req).encode(), capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        return r.stdout.decode("utf-8")


@pytest.fixture(scope="session")
def go_render(tmp_path_factory) -> GoRenderer:
    return GoRenderer(tmp_path_factory.mktemp("go"))


def test_go_toolchain_builds_the_renderer(go_render):
    # Fails (never skips) without Go, with the install command in the message.
    assert go_render("{{ .Prompt }}", data={"Prompt": "x"}) == "x"


def test_renderer_follows_ollamas_execute(go_render):
    # Ollama appends {{ .Response }} to templates that name neither Messages nor Response, and merges
    # consecutive same-role messages; missing keys render as the zero value.
    assert go_render("[{{ .Prompt }}]", messages=[{"role": "user", "content": "a"}]) == "[a]"
    assert go_render("{{ range .Messages }}{{ .Role }}={{ .Content }};{{ end }}",
                     messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "user=a\n\nb;"
    assert go_render("{{ .System }}|{{ range .Messages }}{{ .Role }};{{ end }}",
                     messages=[{"role": "system", "content": "s1"}, {"role": "user", "content": "u"},
                               {"role": "system", "content": "s2"}]) == "s1\n\ns2|system;user;system;"


# ------------------------------------------------------------------------------------------------ alpaca

ALPACA_ROWS = [
    {"instruction": "Explain Python lists.", "input": "", "output": "A list holds items."},
    {"instruction": "Unicode: café ✓ naïve Ωμέγα 🐍 日本語", "input": "", "output": "ok"},
    {"instruction": "Quotes: 'single' \"double\" `back` \\ backslash", "input": "", "output": "ok"},
    {"instruction": "First line.\nSecond line.\n\n    indented code\n\tand a tab", "input": "", "output": "ok"},
    {"instruction": "Template-looking text: {{ .Prompt }} {{ end }} \"\"\"", "input": "", "output": "ok"},
    {"instruction": "What does this error mean?", "input": "TypeError: can only concatenate str (not \"int\") to str",
     "output": "You added a str and an int."},
    {"instruction": "Fix the code.", "input": "for i in range(3):\nprint(i)  # café", "output": "Indent it."},
]
ALPACA_IDS = ["ascii", "unicode", "quotes", "newlines", "go-syntax", "with-input", "with-input-multiline"]


@pytest.fixture(scope="module")
def alpaca_strategy(tiny_model):
    from axolotl.prompt_tokenizers import AlpacaPromptTokenizingStrategy
    from axolotl.prompters import AlpacaPrompter
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    return AlpacaPromptTokenizingStrategy(AlpacaPrompter("instruct"), tok, False, 512), tok


def alpaca_training_prompt(strategy, row: dict) -> str:
    strat, tok = strategy
    ids = strat.tokenize_prompt(dict(row))
    prompt_ids = [i for i, lab in zip(ids["input_ids"], ids["labels"]) if lab == -100]
    assert len(prompt_ids) < len(ids["input_ids"]), "the row has no trained tokens"
    return tok.decode(prompt_ids, skip_special_tokens=True)


@pytest.mark.parametrize("row", ALPACA_ROWS, ids=ALPACA_IDS)
def test_alpaca_ollama_render_is_the_training_prompt(go_render, alpaca_strategy, row):
    trained = alpaca_training_prompt(alpaca_strategy, row)
    system, prompt = ALPACA.serve_fields(row["instruction"], row["input"])
    assert system == (ALPACA_SYSTEM_WITH_INPUT if row["input"] else ALPACA.system)
    # The values as the brief states them ...
    assert go_render(ALPACA.template, data={"System": system, "Prompt": prompt}) == trained
    # ... and what Ollama's Execute really does with /api/generate's [system, user] (legacy path, cut after
    # {{ .Response }}), the same.
    assert go_render(ALPACA.template, messages=[{"role": "system", "content": system},
                                                {"role": "user", "content": prompt}]) == trained
    assert ALPACA.render(row["instruction"], row["input"]) == trained


def test_alpaca_with_input_under_the_default_system_differs_only_in_the_preamble(go_render, alpaca_strategy):
    row = ALPACA_ROWS[ALPACA_IDS.index("with-input")]
    trained = alpaca_training_prompt(alpaca_strategy, row)
    _, prompt = ALPACA.serve_fields(row["instruction"], row["input"])
    served = go_render(ALPACA.template, data={"System": ALPACA.system, "Prompt": prompt})
    assert served != trained
    assert served.replace(ALPACA_SYSTEM_NO_INPUT, ALPACA_SYSTEM_WITH_INPUT, 1) == trained


def test_alpaca_without_system_drops_the_preamble(go_render):
    assert go_render(ALPACA.template, data={"Prompt": "Hi"}) == "### Instruction:\nHi\n\n### Response:\n"


# ------------------------------------------------------------------------------------------------ chat templates

# The special tokens each template needs, end-of-turn first: the tokenizer copy gets them, with the end of turn as
# its EOS as ChatML / Llama 3 instruct checkpoints have it, so Axolotl trains the stop string the Modelfile uses.
CHAT_SPECIALS = {
    "chatml": ["<|im_end|>", "<|im_start|>"],
    "llama3": ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
}

SYSTEM = "You are a patient Python tutor."
CONVERSATIONS = {
    "system-user": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Explain Python lists."},
    ],
    "multi-turn": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Explain Python lists."},
        {"role": "assistant", "content": "A list holds items in order.\n\n```python\nx = [1, 2]\n```"},
        {"role": "user", "content": "And tuples?"},
    ],
    "user-only": [
        {"role": "user", "content": "What is a dict?"},
    ],
    "unicode-quotes-newlines": [
        {"role": "system", "content": "Réponds en français ✓ — \"poliment\"."},
        {"role": "user", "content": "café 🐍 'q' \"d\" `b` \\\nline2\n\n\tx = {{ .Content }}"},
        {"role": "assistant", "content": "D'accord: 日本語 {{ end }}"},
        {"role": "user", "content": "Merci!\nEncore?"},
    ],
}
FINAL_ANSWER = "Here you go.\n\n```python\nt = (1, 2)\n```"


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def chat(request, tiny_model):
    from axolotl.prompt_strategies.chat_template import load
    from axolotl.utils.dict import DictDefault
    from transformers import AutoTokenizer

    name = request.param
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert tok.add_special_tokens({"additional_special_tokens": CHAT_SPECIALS[name]}) == len(CHAT_SPECIALS[name])
    tok.eos_token = CHAT_SPECIALS[name][0]
    cfg = DictDefault({"chat_template": name, "sequence_len": 512, "train_on_inputs": False})
    strategy = load(tok, cfg, {"type": "chat_template", "field_messages": "messages"})
    return name, for_chat_template(name), strategy, tok


def chat_training_prompt(chat, messages: list[dict]) -> str:
    """The decoded tokens Axolotl trains on before the final assistant turn's content (ends with its header)."""
    name, fmt, strategy, tok = chat
    out = strategy.tokenize_prompt({"messages": [dict(m) for m in messages]
                                    + [{"role": "assistant", "content": FINAL_ANSWER}]})
    ids, labels = list(out["input_ids"]), list(out["labels"])
    end = len(labels)
    while end and labels[end - 1] == -100:       # untrained tail (chatml's "\n" after <|im_end|>)
        end -= 1
    start = end
    while start and labels[start - 1] != -100:   # the final assistant turn's trained span
        start -= 1
    assert 0 < start < end, f"no trained final turn: {labels}"
    # It is the answer and then the end-of-turn token: the stop string the Modelfile uses is what the model learns.
    assert tok.decode(ids[start:end], skip_special_tokens=False) == FINAL_ANSWER + fmt.stops[0]
    prompt = ids[:start]
    if name == "llama3":  # Axolotl's llama3 template writes bos_token itself; llama.cpp adds it at serve time
        assert prompt[0] == tok.bos_token_id
        prompt = prompt[1:]
    else:                 # chatml writes no BOS (right for ChatML models, whose GGUFs don't add one)
        assert tok.bos_token_id not in prompt
    return tok.decode(prompt, skip_special_tokens=False)


@pytest.mark.parametrize("conv", list(CONVERSATIONS), ids=list(CONVERSATIONS))
def test_chat_ollama_render_is_the_training_prompt(go_render, chat, conv):
    name, fmt, _, _ = chat
    messages = CONVERSATIONS[conv]
    trained = chat_training_prompt(chat, messages)
    assert fmt.render_messages(messages) == trained
    assert trained.endswith(fmt.render_messages([]))  # the assistant header (generation prompt)

    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    data = {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    # .Messages as stated in the brief, and through Ollama's Execute (its .Messages path) ...
    assert go_render(fmt.template, data=data) == trained
    assert go_render(fmt.template, messages=messages) == trained
    # ... and the TEMPLATE's .System/.Prompt/.Response branch via Ollama's legacy per-turn path.
    assert go_render(fmt.template, messages=messages, force_legacy=True) == trained
    if [m["role"] for m in messages] in (["system", "user"], ["user"]):
        prompt = messages[-1]["content"]
        assert go_render(fmt.template, data={"System": system, "Prompt": prompt}) == trained


def test_chat_render_serves_alpaca_rows_as_one_user_turn(chat):
    _, fmt, _, _ = chat
    assert fmt.render("Fix it.", "x = 1") == fmt.render_messages([{"role": "user", "content": "Fix it.\n\nx = 1"}])
    assert fmt.render("Hi") == fmt.render_messages([{"role": "user", "content": "Hi"}])


def test_llama3_trim_is_a_known_serving_difference(go_render, chat):
    # Axolotl's llama3 template trims each message's content; Ollama's template functions have no trim.
    name, fmt, _, _ = chat
    if name != "llama3":
        assert go_render(fmt.template, messages=[{"role": "user", "content": "  padded \n"}]) == \
            fmt.render_messages([{"role": "user", "content": "  padded \n"}])
        return
    padded = [{"role": "user", "content": "  padded \n"}]
    trained = chat_training_prompt(chat, padded)
    assert trained == fmt.render_messages(padded) == fmt.render_messages([{"role": "user", "content": "padded"}])
    assert go_render(fmt.template, messages=padded) != trained
    assert go_render(fmt.template, messages=[{"role": "user", "content": "padded"}]) == trained


def test_format_lookup_and_stops():
    assert for_dataset("alpaca") is ALPACA
    assert for_chat_template("chatml") is CHATML and for_chat_template("llama3") is LLAMA3
    with pytest.raises(ValueError, match="chat_template"):
        for_chat_template("vicuna")
    assert CHATML.stops[0] == "<|im_end|>" and LLAMA3.stops[0] == "<|eot_id|>"
    assert ALPACA.stops == ("### Instruction:", "### Input:")


@pytest.mark.parametrize("fmt", [ALPACA, for_dataset("chat", CHATML), for_dataset("sharegpt", LLAMA3),
                                 for_dataset("chat", CHATML.with_default_system('A "quoted"\nsystem', "{{ x }}"))],
                         ids=["alpaca", "chatml", "llama3", "chatml-default-system"])
def test_templates_are_valid_modelfile_values(fmt):
    from tutor_wrap.backends import modelfile

    spec = modelfile.ModelfileSpec(from_path="./m.gguf", template=fmt.template, system=fmt.system or None,
                                   stops=fmt.stops)
    text = modelfile.render(spec)
    assert "TEMPLATE" in text


# ------------------------------------------------------------------------------------------------ chat rows, own template

def ollama_messages(fmt, messages: list[dict]) -> list[dict]:
    """What Ollama's chat handler passes to the template: the Modelfile's SYSTEM first when the request has no
    system message (server/routes.go: `if req.Messages[0].Role != "system" && m.System != ""`)."""
    if fmt.system and messages[0]["role"] != "system":
        return [{"role": "system", "content": fmt.system}, *messages]
    return messages


@pytest.fixture(scope="module")
def own_template(tiny_chat_model, tmp_path_factory):
    """Chat and ShareGPT rows on the tiny chat model in its own template, through the Axolotl entries tutor_wrap
    writes (`dataset.chat_template: tokenizer`), tokenized by Axolotl's chat_template strategy."""
    from axolotl.prompt_strategies.chat_template import load
    from axolotl.utils.dict import DictDefault
    from transformers import AutoTokenizer

    from tiny_model import CHAT_DEFAULT_SYSTEM
    from tutor_wrap.data.chat_templates import identify
    from tutor_wrap.models.files import read_tokenizer_info
    from tutor_wrap.recipe.schema import DatasetSpec

    chat = identify(read_tokenizer_info(tiny_chat_model).chat_template)
    assert chat is not None and chat.name == "chatml" and chat.default_system == CHAT_DEFAULT_SYSTEM
    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    out = {}
    for shape in ("chat", "sharegpt"):
        fmt = for_dataset(shape, chat)
        spec = DatasetSpec(path="rows.jsonl", format=shape, chat_template="tokenizer")
        cfg = DictDefault({"sequence_len": 512, "train_on_inputs": False, **fmt.axolotl_settings()})
        out[shape] = fmt, load(tok, cfg, fmt.axolotl_dataset(spec, Path("rows.jsonl")))
    return out, tok


def tokenized(own_template, shape: str, messages: list[dict]) -> tuple[list[int], list[int]]:
    strategies, _ = own_template
    fmt, strategy = strategies[shape]
    if shape == "sharegpt":
        names = {"user": "human", "assistant": "gpt", "system": "system"}
        row = {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]}
    else:
        row = {"messages": [dict(m) for m in messages]}
    out = strategy.tokenize_prompt(row)
    return list(out["input_ids"]), list(out["labels"])


@pytest.mark.parametrize("conv", list(CONVERSATIONS), ids=list(CONVERSATIONS))
def test_own_template_serves_every_turn_as_trained(go_render, own_template, conv):
    strategies, tok = own_template
    fmt, _ = strategies["chat"]
    messages = CONVERSATIONS[conv]
    ids, labels = tokenized(own_template, "chat", messages + [{"role": "assistant", "content": FINAL_ANSWER}])
    # Every assistant turn is trained (its text and its <|im_end|>), nothing else is.
    spans, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != -100:
            cur.append(i)
        elif cur:
            spans.append(tok.decode(cur, skip_special_tokens=False))
            cur = []
    spans += [tok.decode(cur, skip_special_tokens=False)] if cur else []
    answers = [m["content"] for m in messages if m["role"] == "assistant"] + [FINAL_ANSWER]
    assert spans == [a + "<|im_end|>" for a in answers]
    # The prompt: everything before the final answer, as Axolotl tokenized it.
    start = max(i for i, lab in enumerate(labels) if lab == -100 and i < len(labels) - 1
                and labels[i + 1] != -100)
    trained = tok.decode(ids[: start + 1], skip_special_tokens=False)
    assert fmt.chat.render_messages(messages) == trained
    # Ollama: the Modelfile's SYSTEM is the template's default system text, prepended by Ollama as training's
    # template inserted it; Go's text/template renders the TEMPLATE to the same bytes.
    assert go_render(fmt.template, messages=ollama_messages(fmt, messages)) == trained
    # llama-server / Hugging Face: the model's own Jinja (kept as the merged model's and the GGUF's template).
    from tutor_wrap.data.chat_templates import render_jinja

    assert render_jinja(fmt.chat_template, messages) == trained


@pytest.mark.parametrize("conv", list(CONVERSATIONS), ids=list(CONVERSATIONS))
def test_sharegpt_rows_train_exactly_like_chat_rows(own_template, conv):
    messages = CONVERSATIONS[conv] + [{"role": "assistant", "content": FINAL_ANSWER}]
    assert tokenized(own_template, "sharegpt", messages) == tokenized(own_template, "chat", messages)


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_named_templates_jinja_renders_like_training(name):
    from tutor_wrap.data.chat_templates import render_jinja

    t = for_chat_template(name)
    for messages in CONVERSATIONS.values():
        assert render_jinja(t.jinja, messages) == t.render_messages(messages)
        assert render_jinja(t.jinja, messages, add_generation_prompt=False) == \
            t.render_messages(messages, add_generation_prompt=False)
    assert "bos_token" not in t.jinja
