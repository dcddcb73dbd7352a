"""Chat templates (chatml, llama3) in the places they must agree: training, the model's Jinja, serving.

For chat data (Axolotl `type: chat_template`) `render_messages` is the text Axolotl's chat_template strategy
tokenizes for a conversation (with the generation prompt: up to and including the final assistant header),
`jinja` is the same template as the model's `chat_template` (what Hugging Face and llama-server render), and
`template` is the Ollama TEMPLATE that renders the same text. The TEMPLATEs follow Ollama's own
`template/chatml.gotmpl` and `template/llama3-instruct.gotmpl` (github.com/ollama/ollama at
fb30760996871fa9460115c753afd2c60d4ab0f7) for `.Messages`, with the `.System`/`.Prompt`/`.Response` form of
Ollama's older library templates as the else-branch; `stops` are those files' `.json` stop lists.
tests/test_parity_go.py renders every TEMPLATE with Go's text/template exactly as Ollama does and compares with
what Axolotl tokenizes, byte for byte.

A base model's own template (`chat_template: tokenizer`) is served only when `identify` proves it is one of these
(rendered on probe conversations, byte for byte), possibly with a default system message it inserts when a
conversation has none (SmolLM2, Qwen 2.5 do): Ollama does the same with the Modelfile's SYSTEM, which is why that
text becomes `default_system` and the Modelfile's SYSTEM.

Known limits of serving chat formats through an Ollama TEMPLATE (Go templates cannot express them):
- Ollama merges consecutive messages of the same role into one, joined by "\n\n"; training renders each as
  its own turn. Conversations that alternate roles (the usual case, and what the dataset check demands) are
  unaffected.
- Axolotl's `llama3` template trims whitespace around every message's content (Jinja `| trim`); Ollama's
  template functions have no trim, so a message with leading/trailing whitespace renders differently at serve
  time (the test pins this). `render_messages` follows training (it trims).
- BOS is not part of any TEMPLATE: llama.cpp adds it when the GGUF says `add_bos_token`. Axolotl's `llama3`
  template writes `bos_token` itself (so training and serving agree for Llama 3 models); `chatml` writes none,
  which agrees with ChatML models (SmolLM2, Qwen: `add_bos_token: false`) but not with a tokenizer that adds a
  BOS (e.g. a Llama 2 tokenizer given ChatML tokens): there llama.cpp would prepend one that training never saw.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


def _check_messages(messages: list[dict]) -> list[tuple[str, str]]:
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(f"messages[{i}] needs a str 'role' and a str 'content', got {m!r}")
        out.append((role, content))
    return out


def _jinja_str(text: str) -> str:
    """A Jinja string literal for `text` (both Jinja2 and llama.cpp's engine read these escapes)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def render_jinja(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                 bos_token: str = "", eos_token: str = "") -> str:
    """A chat template rendered as transformers' apply_chat_template renders it (sandboxed Jinja, trim_blocks,
    lstrip_blocks, raise_exception), without tokenizing."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=bos_token, eos_token=eos_token)


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template: `render_messages` is the training text of a conversation.

    `default_system`: the system message the template inserts when a conversation has none ("" for none).
    `axolotl`: the value of Axolotl's `chat_template` key that trains with it. `tokens`: the special tokens the
    text uses, end of turn first (the tokenizer must have them as single tokens, or training learns pieces).
    """

    name: str
    axolotl: str
    template: str                      # Ollama TEMPLATE (Go text/template)
    section_markers: tuple[str, ...]
    stops: tuple[str, ...]
    tokens: tuple[str, ...]
    default_system: str = ""
    own_jinja: str | None = None       # the base model's own template text, when it was identified as this one

    generation_prompt = ""

    def turn(self, role: str, content: str) -> str:
        raise NotImplementedError

    def _jinja_turn(self) -> str:
        raise NotImplementedError

    @property
    def end_of_turn(self) -> str:
        return self.tokens[0]

    def render_messages(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        turns = _check_messages(messages)
        if self.default_system and (not turns or turns[0][0] != "system"):
            turns = [("system", self.default_system), *turns]
        return "".join(self.turn(r, c) for r, c in turns) + (self.generation_prompt if add_generation_prompt else "")

    def render(self, instruction: str, input_text: str = "") -> str:
        """An Alpaca-style request as one user turn (the input after the instruction, a blank line between)."""
        user = f"{instruction}\n\n{input_text}" if input_text else instruction
        return self.render_messages([{"role": "user", "content": user}])

    @property
    def jinja(self) -> str:
        """The model's chat_template: the base model's own text when it was identified, else one written here that
        renders as `render_messages` (tests/test_chat_template.py). Never writes bos_token."""
        if self.own_jinja is not None:
            return self.own_jinja
        default = ""
        if self.default_system:
            default = ("{%- if not messages or messages[0]['role'] != 'system' -%}{{- "
                       + _jinja_str(self.turn("system", self.default_system)) + " -}}{%- endif -%}")
        return (default + "{%- for message in messages -%}" + self._jinja_turn() + "{%- endfor -%}"
                "{%- if add_generation_prompt -%}{{- " + _jinja_str(self.generation_prompt) + " -}}{%- endif -%}")

    def with_default_system(self, system: str, own_jinja: str) -> "ChatTemplate":
        return dataclasses.replace(self, default_system=system, own_jinja=own_jinja, axolotl="tokenizer_default")


@dataclass(frozen=True)
class ChatML(ChatTemplate):
    # axolotl/utils/chat_templates/templates/chatml.jinja (Axolotl 0.19)
    generation_prompt = "<|im_start|>assistant\n"

    def turn(self, role: str, content: str) -> str:
        return f"<|im_start|>{role}\n{content}<|im_end|>\n"

    def _jinja_turn(self) -> str:
        return ("{{- '<|im_start|>' + message['role'] + " + _jinja_str("\n") + " + message['content'] + "
                + _jinja_str("<|im_end|>\n") + " -}}")


@dataclass(frozen=True)
class Llama3(ChatTemplate):
    # axolotl/utils/chat_templates/templates/llama3.jinja (Axolotl 0.19), without its leading bos_token
    generation_prompt = "<|start_header_id|>assistant<|end_header_id|>\n\n"

    def turn(self, role: str, content: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>"

    def _jinja_turn(self) -> str:
        return ("{{- '<|start_header_id|>' + message['role'] + " + _jinja_str("<|end_header_id|>\n\n")
                + " + message['content'] | trim + '<|eot_id|>' -}}")


# .Messages: Ollama's template/chatml.gotmpl. Without .Messages (Ollama's legacy single-turn values): the
# .System/.Prompt form; on a history turn (.Response set) it closes the turn as training does.
CHATML = ChatML(
    name="chatml",
    axolotl="chatml",
    template=(
        "{{- if .Messages }}\n"
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
        "{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n"
        "{{ else }}\n"
        "{{- if .System }}<|im_start|>system\n"
        "{{ .System }}<|im_end|>\n"
        "{{ end }}{{ if .Prompt }}<|im_start|>user\n"
        "{{ .Prompt }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n"
        "{{ .Response }}{{ if .Response }}<|im_end|>\n"
        "{{ end }}\n"
        "{{- end }}"
    ),
    section_markers=("<|im_start|>",),
    stops=("<|im_end|>", "<|im_start|>"),
    tokens=("<|im_end|>", "<|im_start|>"),
)

# .Messages: Ollama's template/llama3-instruct.gotmpl; else the .System/.Prompt form of Ollama's llama3 template.
LLAMA3 = Llama3(
    name="llama3",
    axolotl="llama3",
    template=(
        "{{- if .Messages }}\n"
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>\n"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
        "{{ else }}\n"
        "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n"
        "{{ .System }}<|eot_id|>\n"
        "{{- end }}{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n"
        "{{ .Prompt }}<|eot_id|>\n"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
        "{{ .Response }}{{ if .Response }}<|eot_id|>{{ end }}\n"
        "{{- end }}"
    ),
    section_markers=("<|start_header_id|>",),
    stops=("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
    tokens=("<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
)

# The templates with a proven Ollama TEMPLATE. Adding one: a ChatTemplate subclass and one line here.
CHAT_TEMPLATES: dict[str, ChatTemplate] = {"chatml": CHATML, "llama3": LLAMA3}
TOKENIZER = "tokenizer"     # the recipe's name for "the base model's own template"

# Conversations on which a model's own template must render exactly as a known one to be served as it.
_PROBE_SYSTEM = "You are a terse assistant."
_PROBES = [
    [{"role": "user", "content": "Hello there."}],
    [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": "Hello there."}],
    [{"role": "system", "content": _PROBE_SYSTEM}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?\nThanks."}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3?"}],
    # ends with the answer, as every training row does: a template that writes its last assistant turn otherwise
    # (an empty reasoning block before it) trains text the served prompt never shows
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
]
# What a template that writes reasoning blocks (Qwen3, DeepSeek-R1 style) has in its Jinja.
REASONING_MARKS = ("<think>", "reasoning_content", "enable_thinking")


def reasoning_mark(own: str) -> str | None:
    """The reasoning-block marker a model's own template carries (None: none): such a template renders turns that
    differ by whether the model "thinks", which no Ollama TEMPLATE tutor_wrap writes reproduces."""
    return next((m for m in REASONING_MARKS if m in own), None)


def for_chat_template(name: str) -> ChatTemplate:
    """The template for Axolotl's `chat_template: NAME` (chatml, llama3)."""
    try:
        return CHAT_TEMPLATES[name]
    except KeyError:
        raise ValueError(f"no prompt format for chat_template {name!r}; known: {', '.join(CHAT_TEMPLATES)}") from None


def identify(own: str) -> ChatTemplate | None:
    """The known template that a model's own Jinja `own` renders exactly like on every probe conversation (with and
    without the generation prompt), carrying the default system message it inserts; None when there is none.

    A template that writes `bos_token` first is matched without it (training and llama.cpp put the BOS token
    there from the tokenizer); `bos_token` anywhere else, or any other variable it needs, is no match."""
    mark = "\x02bos\x03"

    def rendered(messages, gen):
        text = render_jinja(own, messages, add_generation_prompt=gen, bos_token=mark, eos_token="\x02eos\x03")
        text = text[len(mark):] if text.startswith(mark) else text
        if "\x02" in text:
            raise ValueError("special token text inside the conversation")
        return text

    try:
        user_only = rendered(_PROBES[0], True)
    except Exception:      # tools, dates, other variables or tokens: not a template we can serve
        return None
    for cand in CHAT_TEMPLATES.values():
        plain = cand.render_messages(_PROBES[0])
        default = ""
        if user_only != plain:
            head, _, tail = cand.turn("system", "\x00").partition("\x00")
            prefix = user_only[: len(user_only) - len(plain)]
            if not (user_only.endswith(plain) and prefix.startswith(head) and prefix.endswith(tail)
                    and len(prefix) > len(head) + len(tail)):
                continue
            default = prefix[len(head): len(prefix) - len(tail)]
        found = cand.with_default_system(default, own)
        try:
            if all(rendered(p, gen) == found.render_messages(p, add_generation_prompt=gen)
                   for p in _PROBES for gen in (True, False)):
                return found
        except Exception:
            continue
    return None
