"""The prompt format a model was trained with, in the three places it must agree: training, eval, serving.

For `alpaca` these strings follow Axolotl 0.19's `AlpacaPrompter` (instruct style) exactly; the parity test in
tests/ checks them against what Axolotl really tokenizes, so a change in Axolotl shows up as a failing test.
"""

from __future__ import annotations

from dataclasses import dataclass

ALPACA_SYSTEM_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_SYSTEM_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


@dataclass(frozen=True)
class PromptFormat:
    name: str
    system: str                 # the system text training used (Ollama's SYSTEM)
    template: str               # Go text/template for Ollama's TEMPLATE
    section_markers: tuple[str, ...]  # text that starts a new turn: seeing it in an answer means a runaway

    def render(self, instruction: str, input_text: str = "") -> str:
        raise NotImplementedError


class Alpaca(PromptFormat):
    def render(self, instruction: str, input_text: str = "") -> str:
        if input_text:
            return (f"{ALPACA_SYSTEM_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n"
                    f"### Input:\n{input_text}\n\n### Response:\n")
        return f"{ALPACA_SYSTEM_NO_INPUT}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


# Single-turn serving: Ollama fills .System from SYSTEM and .Prompt from the user's message. Requests with an
# input field are sent as part of the prompt; training's with-input preamble only applies to rows that had one.
ALPACA = Alpaca(
    name="alpaca",
    system=ALPACA_SYSTEM_NO_INPUT,
    template="{{ if .System }}{{ .System }}\n\n{{ end }}### Instruction:\n{{ .Prompt }}\n\n### Response:\n{{ .Response }}",
    section_markers=("### Instruction:", "### Input:", "### Response:"),
)


def for_dataset(fmt: str) -> PromptFormat:
    if fmt == "alpaca":
        return ALPACA
    raise ValueError(f"no prompt format for dataset format {fmt!r}")
