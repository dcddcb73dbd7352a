"""Chat templates (chatml, llama3) in the places they must agree: training, eval, serving.

For chat data (Axolotl `type: chat_template` with `chat_template: chatml` / `llama3`) `render_messages` is the text
Axolotl's chat_template strategy tokenizes for a conversation, up to and including the final assistant header (the
generation prompt), and `template` is the Ollama TEMPLATE that renders the same text. The TEMPLATEs follow Ollama's
own `template/chatml.gotmpl` and `template/llama3-instruct.gotmpl` (github.com/ollama/ollama at
fb30760996871fa9460115c753afd2c60d4ab0f7) for `.Messages`, with the `.System`/`.Prompt`/`.Response` form of
Ollama's older library templates as the else-branch; `stops` are those files' `.json` stop lists.
tests/test_parity_go.py renders every TEMPLATE with Go's text/template exactly as Ollama does and compares with
what Axolotl tokenizes, byte for byte.

Known limits of serving chat formats through an Ollama TEMPLATE (Go templates cannot express them):
- Ollama merges consecutive messages of the same role into one, joined by "\n\n"; training renders each as
  its own turn. Conversations that alternate roles (the usual case) are unaffected.
- Axolotl's `llama3` template trims whitespace around every message's content (Jinja `| trim`); Ollama's
  template functions have no trim, so a message with leading/trailing whitespace renders differently at serve
  time (the test pins this). `render_messages` follows training (it trims).
- BOS is not part of any TEMPLATE: llama.cpp adds it when the GGUF says `add_bos_token`. Axolotl's `llama3`
  template writes `bos_token` itself (so training and serving agree for Llama 3 models); `chatml` writes none,
  which agrees with ChatML models (SmolLM2, Qwen: `add_bos_token: false`) but not with a tokenizer that adds a
  BOS (e.g. a Llama 2 tokenizer given ChatML tokens): there llama.cpp would prepend one that training never saw.
"""

from __future__ import annotations


def _check_messages(messages: list[dict]) -> list[tuple[str, str]]:
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(f"messages[{i}] needs a str 'role' and a str 'content', got {m!r}")
        out.append((role, content))
    return out


class ChatTemplate:
    """A chat template: `render_messages` is the training text for a conversation, ending with the assistant header.

    `render(instruction, input)` serves Alpaca-style rows through it: one user message, the input (when there is
    one) after the instruction separated by a blank line, preceded by a system message when `system` is set.
    """

    generation_prompt: str = ""

    def __init__(self, name: str, system: str, template: str, section_markers: tuple[str, ...],
                 stops: tuple[str, ...]):
        self.name, self.system, self.template = name, system, template
        self.section_markers, self.stops = section_markers, stops

    def turn(self, role: str, content: str) -> str:
        raise NotImplementedError

    def render_messages(self, messages: list[dict]) -> str:
        return "".join(self.turn(r, c) for r, c in _check_messages(messages)) + self.generation_prompt

    def render(self, instruction: str, input_text: str = "") -> str:
        user = f"{instruction}\n\n{input_text}" if input_text else instruction
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": user}]
        return self.render_messages(messages)


class ChatML(ChatTemplate):
    # axolotl/utils/chat_templates/templates/chatml.jinja (Axolotl 0.19)
    generation_prompt = "<|im_start|>assistant\n"

    def turn(self, role: str, content: str) -> str:
        return f"<|im_start|>{role}\n{content}<|im_end|>\n"


class Llama3(ChatTemplate):
    # axolotl/utils/chat_templates/templates/llama3.jinja (Axolotl 0.19), without its leading bos_token
    generation_prompt = "<|start_header_id|>assistant<|end_header_id|>\n\n"

    def turn(self, role: str, content: str) -> str:
        return f"<|start_header_id|>{role}<|end_header_id|>\n\n{content.strip()}<|eot_id|>"


# .Messages: Ollama's template/chatml.gotmpl. Without .Messages (Ollama's legacy single-turn values): the
# .System/.Prompt form; on a history turn (.Response set) it closes the turn as training does.
CHATML = ChatML(
    name="chatml",
    system="",
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
)

# .Messages: Ollama's template/llama3-instruct.gotmpl; else the .System/.Prompt form of Ollama's llama3 template.
LLAMA3 = Llama3(
    name="llama3",
    system="",
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
)

CHAT_TEMPLATES: dict[str, ChatTemplate] = {"chatml": CHATML, "llama3": LLAMA3}


def for_chat_template(name: str) -> ChatTemplate:
    """The format for Axolotl's `chat_template: NAME` (chatml, llama3)."""
    try:
        return CHAT_TEMPLATES[name]
    except KeyError:
        raise ValueError(f"no prompt format for chat_template {name!r}; known: {', '.join(CHAT_TEMPLATES)}") from None
