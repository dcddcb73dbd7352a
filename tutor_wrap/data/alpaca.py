"""Alpaca rows (instruction, input, output): reading, the training prompt, Axolotl's entry, Ollama's template.

The strings follow Axolotl 0.19's `AlpacaPrompter` (instruct style) exactly; the parity tests in tests/ check them
against what Axolotl really tokenizes, so a change in Axolotl shows up as a failing test.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.data.format import Dataset, Format
from tutor_wrap.data.jsonl import line_numbers, read_objects

ALPACA_SYSTEM_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA_SYSTEM_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
_EXAMPLE = '{"instruction": "...", "input": "", "output": "..."}'
_JSON_TYPES = {"int": "number", "float": "number", "bool": "true/false", "list": "list", "dict": "object"}


def _jinja_str(text: str) -> str:
    """A Jinja string literal for `text` (both Jinja2 and llama.cpp's engine read these escapes)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# The training prompt as a chat template: a leading system message (or, without one, the no-input preamble
# training used), then each user turn as an instruction followed by the response header. A request with an input
# field sends it inside the user turn, with the with-input preamble as its system message (see serve_fields).
# Only expressions, no literal text between tags, so trim_blocks/lstrip_blocks cannot change a byte.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] -%}{{- messages[0]['content'] + " + _jinja_str("\n\n") + " -}}{%- endif -%}"
    "{%- else -%}{{- " + _jinja_str(ALPACA_SYSTEM_NO_INPUT + "\n\n") + " -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- " + _jinja_str("### Instruction:\n") + " + message['content'] + " + _jinja_str("\n\n### Response:\n") + " -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- message['content'] + " + _jinja_str("\n\n") + " -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


@dataclass(frozen=True)
class AlpacaRow:
    line: int
    instruction: str
    input: str
    output: str


def load_alpaca(path: Path, *, require_output: bool = True, key: str = "dataset.path") -> Dataset[AlpacaRow]:
    path = Path(path)
    rows: list[AlpacaRow] = []
    missing: dict[str, list[int]] = {}
    needed = ("instruction", "output") if require_output else ("instruction",)
    wrong_type: dict[str, tuple[str, list[int]]] = {}
    objs = read_objects(path, example=_EXAMPLE, key=key)
    _refuse_other_shapes(path, objs, key)
    for n, obj in objs:
        for k in ("instruction", "input", "output"):
            v = obj.get(k)
            if v is not None and not isinstance(v, str):
                wrong_type.setdefault(k, (_JSON_TYPES.get(type(v).__name__, type(v).__name__), []))[1].append(n)
        absent = [k for k in needed if not isinstance(obj.get(k), str) or not obj.get(k).strip()]
        for k in absent:
            if obj.get(k) is None or isinstance(obj.get(k), str):
                missing.setdefault(k, []).append(n)
        if absent or any(n in lines for _, lines in wrong_type.values()):
            continue
        rows.append(AlpacaRow(n, obj["instruction"], obj.get("input") or "", obj.get("output") or ""))
    if wrong_type:
        k, (found, lines) = next(iter(wrong_type.items()))
        raise TutorWrapError(f"{path}: line {line_numbers(lines)}: '{k}' is a {found}, not a string",
                             hint=f"write '{k}' as text in quotes (an empty input is \"\")")
    if missing:
        k, lines = next(iter(missing.items()))
        raise TutorWrapError(
            f"{path}: line {line_numbers(lines)}: missing or empty '{k}'",
            hint="every Alpaca row needs a non-empty 'instruction' and 'output' ('input' may be empty)" if require_output
            else f"every {key} row needs a non-empty 'instruction' ('output', the reference answer, is optional)",
        )
    if not rows:
        what = "the dataset" if key == "dataset.path" else f"the {key} file"
        raise TutorWrapError(f"{path}: {what} is empty", hint="add at least one Alpaca row")
    warnings = []
    seen: set[tuple[str, str, str]] = set()
    dups = []
    for r in rows:
        k3 = (r.instruction.strip(), r.input.strip(), r.output.strip())
        if k3 in seen:
            dups.append(r.line)
        seen.add(k3)
    if dups:
        warnings.append(f"{path}: line {line_numbers(dups)} duplicate an earlier row (they weigh twice in training)")
    return Dataset(path, rows, warnings)


# Shapes of other dataset formats, recognised to say what the rows are instead of "missing 'instruction'" on each.
_OTHER_SHAPES = {"messages": ("chat rows (OpenAI-style 'messages')", "set dataset.format: chat in the recipe"),
                 "conversations": ("ShareGPT rows ('conversations')", "set dataset.format: sharegpt in the recipe"),
                 "prompt": ("prompt/completion rows", 'convert them to {"instruction": ..., "input": "", "output": ...}'),
                 "text": ("plain-text rows ('text')", 'convert them to {"instruction": ..., "input": "", "output": ...}')}


def _refuse_other_shapes(path: Path, objs: list[tuple[int, dict]], key: str) -> None:
    if not objs:
        return
    if any("instruction" in o for _, o in objs):
        mixed = [n for n, o in objs if "instruction" not in o and any(f in o for f in _OTHER_SHAPES)]
        if mixed:
            raise TutorWrapError(f"{path}: line {line_numbers(mixed)} are not Alpaca rows but the others are: one "
                                 "file holds one format", hint="convert them to Alpaca rows or move them to their own dataset")
        return
    first = objs[0][1]
    shape = next((v for field, v in _OTHER_SHAPES.items() if field in first), None)
    if shape and key != "dataset.path":
        # The eval file is in the training rows' format: changing dataset.format would break the training rows.
        raise TutorWrapError(
            f"{path}: the rows are {shape[0]}, and {key} must be in the training rows' format (dataset.format: "
            "alpaca)", hint='write them as {"instruction": ..., "input": "", "output": ...} rows')
    if shape:
        raise TutorWrapError(
            f"{path}: the rows are {shape[0]}, not the Alpaca rows (instruction, input, output) that "
            "dataset.format: alpaca reads", hint=shape[1])


class Alpaca(Format[AlpacaRow]):
    name = "alpaca"
    system = ALPACA_SYSTEM_NO_INPUT
    # Single-turn serving: Ollama fills .System from SYSTEM and .Prompt from the user's message. Requests with an
    # input field are sent as part of the prompt (see serve_fields).
    template = "{{ if .System }}{{ .System }}\n\n{{ end }}### Instruction:\n{{ .Prompt }}\n\n### Response:\n{{ .Response }}"
    section_markers = ("### Instruction:", "### Input:", "### Response:")
    # A runaway answer starts a new instruction or input; "### Response:" only follows one of them.
    stops = ("### Instruction:", "### Input:")
    chat_template = CHAT_TEMPLATE

    def render(self, instruction: str, input_text: str = "") -> str:
        if input_text:
            return (f"{ALPACA_SYSTEM_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n"
                    f"### Input:\n{input_text}\n\n### Response:\n")
        return f"{ALPACA_SYSTEM_NO_INPUT}\n\n### Instruction:\n{instruction}\n\n### Response:\n"

    def serve_fields(self, instruction: str, input_text: str = "") -> tuple[str, str]:
        """(system, prompt) to send to Ollama so that `template` renders exactly `render(instruction, input_text)`.

        Ollama's single-turn values have only .System and .Prompt, so a row with an input goes in the prompt as
        "INSTRUCTION\n\n### Input:\nINPUT" and needs the with-input preamble as its system text (the Modelfile's
        SYSTEM is the no-input one; /api/generate's `system` field overrides it per request).
        """
        if input_text:
            return ALPACA_SYSTEM_WITH_INPUT, f"{instruction}\n\n### Input:\n{input_text}"
        return ALPACA_SYSTEM_NO_INPUT, instruction

    def read(self, path: Path, *, require_output: bool = True, key: str = "dataset.path") -> Dataset[AlpacaRow]:
        return load_alpaca(path, require_output=require_output, key=key)

    def prompt(self, row: AlpacaRow) -> str:
        return self.render(row.instruction, row.input)

    def answer(self, row: AlpacaRow) -> str:
        return row.output

    def messages(self, row: AlpacaRow) -> list[dict[str, str]]:
        system, prompt = self.serve_fields(row.instruction, row.input)
        return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]

    def user_turn(self, row: AlpacaRow) -> str:
        return f"{row.instruction}\n\n{row.input}" if row.input else row.instruction

    def title(self, row: AlpacaRow) -> str:
        return row.instruction

    def axolotl_dataset(self, spec: Any, path: Path | None) -> dict[str, Any]:
        """A local JSONL as Axolotl's `alpaca` type, or a hub dataset whose columns are mapped onto the alpaca roles.

        A hub dataset uses Axolotl's user-defined type with these strings (the system preamble is part of each
        turn format, so a row renders exactly as `alpaca` does, with or without an input).
        """
        if not spec.hub:
            return {"path": str(path), "type": "alpaca", "ds_type": "json"}
        f = spec.fields
        return {"path": spec.hub, "split": spec.hub_split, "type": {
            "field_instruction": f.get("instruction", "instruction"), "field_input": f.get("input", "input"),
            "field_output": f.get("output", "output"), "system_prompt": "", "system_format": "{system}",
            "format": self.render("{instruction}", "{input}"), "no_input_format": self.render("{instruction}")}}


ALPACA = Alpaca()
