"""Chat rows: OpenAI-style `messages` (format `chat`) and ShareGPT `conversations` (format `sharegpt`).

Both become the same conversation (system / user / assistant turns) and train through Axolotl's `chat_template`
strategy in one chat template (data/chat_templates.py): loss on the assistant turns and each one's end-of-turn
token. ShareGPT rows are mapped by Axolotl itself (`message_property_mappings` from/value, and `roles` from the
table below), since Axolotl 0.19 no longer reads the ShareGPT type. Rows are checked here first, with line
numbers, so a file Axolotl would reject (or silently train wrong) fails in the first second.

Eval, export and serving take a conversation up to its last user turn as the prompt and the assistant turn after
it (when there is one) as the reference answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.data.chat_templates import ChatTemplate
from tutor_wrap.data.format import Dataset, Format
from tutor_wrap.data.jsonl import line_numbers, read_objects

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Shape:
    """How one file format writes a conversation."""

    name: str                       # dataset.format
    field: str                      # the row's list of turns
    role: str                       # a turn's role key
    content: str                    # a turn's text key
    roles: dict[str, str]           # the file's role names -> system/user/assistant
    example: str


CHAT = Shape("chat", "messages", "role", "content", {r: r for r in ROLES},
             '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}')
SHAREGPT = Shape("sharegpt", "conversations", "from", "value",
                 {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"},
                 '{"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]}')
SHAPES = {s.name: s for s in (CHAT, SHAREGPT)}


@dataclass(frozen=True)
class ChatRow:
    line: int
    messages: tuple[tuple[str, str], ...]       # (role, content), roles mapped to system/user/assistant

    @property
    def last_user(self) -> int:
        return max(i for i, (role, _) in enumerate(self.messages) if role == "user")


class _Problems:
    """Line numbers per problem, reported together: the first problem's lines, and how many others there are."""

    def __init__(self):
        self.by_kind: dict[str, tuple[list[int], str]] = {}

    def add(self, kind: str, line: int, fix: str) -> None:
        self.by_kind.setdefault(kind, ([], fix))[0].append(line)

    def raise_first(self, path: Path) -> None:
        if not self.by_kind:
            return
        (kind, (lines, fix)), *others = self.by_kind.items()
        more = f" (and {len(others)} other kind(s) of problem)" if others else ""
        raise TutorWrapError(f"{path}: line {line_numbers(lines)}: {kind}{more}", hint=fix)


def load_conversations(path: Path, shape: Shape, *, require_output: bool = True,
                       key: str = "dataset.path", special: tuple[str, ...] = ()) -> Dataset[ChatRow]:
    """`special`: the chat template's own marker tokens, which no turn's text may hold."""
    path = Path(path)
    objs = read_objects(path, example=shape.example, key=key)
    _refuse_other_shapes(path, objs, shape, key)
    bad = _Problems()
    rows: list[ChatRow] = []
    known = ", ".join(shape.roles)
    for n, obj in objs:
        turns = obj.get(shape.field)
        if not isinstance(turns, list) or not turns:
            bad.add(f"missing or empty '{shape.field}' list", n, f"every row needs a non-empty '{shape.field}' list, "
                    f"e.g. {shape.example}")
            continue
        msgs: list[tuple[str, str]] = []
        thought = _reasoning(turns)
        if thought:
            bad.add(f"{thought}: reasoning fields are not supported (tutor_wrap trains, serves and judges the turns' "
                    "text; the reasoning would be dropped from training without a word)", n,
                    "remove the field, or put what the model should learn to write into 'content'")
            continue
        tool = _tool_use(obj, turns, shape)
        if tool:
            bad.add(f"{tool}: tool calls are not supported (tutor_wrap trains, serves and judges plain text turns; "
                    "the calls and the tool schema would be dropped from training without a word)", n,
                    "remove the rows with tool calls, or train them with Axolotl directly and its tool-calling "
                    "chat template")
            continue
        for t in turns:
            if not isinstance(t, dict) or not isinstance(t.get(shape.role), str) or not isinstance(t.get(shape.content), str):
                bad.add(f"a turn without a text '{shape.role}' and '{shape.content}'", n,
                        f"write each turn as {{\"{shape.role}\": ..., \"{shape.content}\": \"...\"}}")
                break
            role = shape.roles.get(t[shape.role])
            if role is None:
                bad.add(f"unknown role {t[shape.role]!r}", n, f"'{shape.role}' is one of: {known}")
                break
            if not t[shape.content].strip():
                bad.add(f"a {role} turn with empty '{shape.content}'", n, "remove the turn or give it text")
                break
            marker = next((tok for tok in special if tok in t[shape.content]), None)
            if marker:
                bad.add(f"a {role} turn holds {marker!r}, the chat template's own marker: the tokenizer reads it as "
                        "a turn boundary, so training and serving would see another conversation than the row's", n,
                        "remove the marker from the text (it is never plain text in this template)")
                break
            unused = next((k for k in _IGNORED_TURN_KEYS if k in t), None)
            if unused:
                bad.add(f"a turn with '{unused}', which tutor_wrap does not apply (which turns train is "
                        "dataset.roles_to_train, for every row)", n,
                        f"remove '{unused}' from the turns, or train such rows with Axolotl directly")
                break
            msgs.append((role, t[shape.content]))
        else:
            problem = _order_problem(msgs, require_output)
            if problem:
                bad.add(problem, n, "a conversation is: an optional system turn, then user and assistant turns "
                        "alternating, starting with user" + (" and ending with assistant (the answer to learn)"
                                                              if require_output else ""))
                continue
            rows.append(ChatRow(n, tuple(msgs)))
    bad.raise_first(path)
    if not rows:
        what = "the dataset" if key == "dataset.path" else f"the {key} file"
        raise TutorWrapError(f"{path}: {what} is empty", hint=f"add at least one row like {shape.example}")
    warnings = []
    seen: set = set()
    dups = []
    for r in rows:
        if r.messages in seen:
            dups.append(r.line)
        seen.add(r.messages)
    if dups:
        warnings.append(f"{path}: line {line_numbers(dups)} duplicate an earlier row (they weigh twice in training)")
    return Dataset(path, rows, warnings)


_TOOL_ROLES = ("tool", "function", "ipython")
_TOOL_KEYS = ("tool_calls", "function_call", "tool_call_id")
_REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
# Per-turn training switches other tools read (Axolotl's message_field_training and the like): silently trained
# here otherwise.
_IGNORED_TURN_KEYS = ("weight", "training", "train", "train_detail")


def _tool_use(obj: dict, turns: list, shape: Shape) -> str | None:
    """What marks the row as a tool-calling conversation (OpenAI/ShareGPT shapes), or None."""
    if obj.get("tools") or obj.get("functions"):
        return "the row lists tools"
    for t in turns:
        if not isinstance(t, dict):
            continue
        keys = [k for k in _TOOL_KEYS if t.get(k)]
        if keys:
            return f"a turn with '{keys[0]}'"
        if t.get(shape.role) in _TOOL_ROLES and t.get(shape.role) not in shape.roles:
            return f"a {t.get(shape.role)!r} turn"
    return None


def _reasoning(turns: list) -> str | None:
    """The reasoning field a turn carries (reasoning_content and its kin), or None."""
    for t in turns:
        found = [k for k in _REASONING_KEYS if isinstance(t, dict) and t.get(k)]
        if found:
            return f"a turn with '{found[0]}' (reasoning)"
    return None


def _order_problem(msgs: list[tuple[str, str]], require_output: bool) -> str | None:
    roles = [r for r, _ in msgs]
    body = roles[1:] if roles[0] == "system" else roles
    if "system" in body:
        return "a system turn after the first turn"
    if not body or body[0] != "user":
        return "the conversation does not start with a user turn"
    if any(a == b for a, b in zip(body, body[1:])):
        # Ollama merges consecutive same-role turns into one; training would render them apart.
        return "two turns in a row from the same role"
    if require_output and body[-1] != "assistant":
        return "the conversation does not end with an assistant turn"
    return None


_OTHER_SHAPES = {"instruction": ("Alpaca rows (instruction, input, output)", "alpaca"),
                 "messages": ("chat rows (OpenAI-style 'messages')", "chat"),
                 "conversations": ("ShareGPT rows ('conversations')", "sharegpt")}


def _refuse_other_shapes(path: Path, objs: list[tuple[int, dict]], shape: Shape, key: str = "dataset.path") -> None:
    """Rows of another format (all of them, or mixed in): one error naming the format and the setting to use."""
    lines: dict[str, list[int]] = {}
    for n, obj in objs:
        if shape.field not in obj:
            other = next((f for f in _OTHER_SHAPES if f in obj), None)
            if other:
                lines.setdefault(other, []).append(n)
    if not lines:
        return
    field, where = next(iter(lines.items()))
    desc, fmt = _OTHER_SHAPES[field]
    if len(where) == len(objs) and key != "dataset.path":
        # The eval file is in the training rows' format: changing dataset.format would break the training rows.
        raise TutorWrapError(f"{path}: the rows are {desc}, and {key} must be in the training rows' format "
                             f"(dataset.format: {shape.name})", hint=f"write them as rows like {shape.example}")
    if len(where) == len(objs):
        raise TutorWrapError(f"{path}: the rows are {desc}, not the rows dataset.format: {shape.name} reads",
                             hint=f"set dataset.format: {fmt} in the recipe")
    raise TutorWrapError(f"{path}: line {line_numbers(where)} are {desc} among {shape.name} rows: one file holds "
                         "one format", hint=f"convert them to {shape.example} or move them to their own dataset")


class Chat(Format[ChatRow]):
    """Conversations in one chat template (chosen by the recipe's `dataset.chat_template`)."""

    def __init__(self, shape: Shape, chat: ChatTemplate):
        self.shape, self.chat = shape, chat
        self.name = shape.name
        self.system = chat.default_system
        self.template = chat.template
        self.section_markers = chat.section_markers
        self.stops = chat.stops
        self.chat_template = chat.jinja

    @property
    def label(self) -> str:
        own = " (the base model's own)" if self.chat.own_jinja is not None else ""
        return f"{self.name} rows in the {self.chat.name} chat template{own}"

    def read(self, path: Path, *, require_output: bool = True, key: str = "dataset.path") -> Dataset[ChatRow]:
        return load_conversations(path, self.shape, require_output=require_output, key=key, special=self.chat.tokens)

    def messages(self, row: ChatRow) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in row.messages[: row.last_user + 1]]

    def prompt(self, row: ChatRow) -> str:
        return self.chat.render_messages(self.messages(row))

    def answer(self, row: ChatRow) -> str:
        after = row.messages[row.last_user + 1: row.last_user + 2]
        return after[0][1] if after else ""

    def training_text(self, row: ChatRow) -> str:
        return self.chat.render_messages([{"role": r, "content": c} for r, c in row.messages],
                                         add_generation_prompt=False)

    def plain_messages(self, row: ChatRow) -> list[dict[str, str]]:
        return self.messages(row)

    def user_turn(self, row: ChatRow) -> str:
        return row.messages[row.last_user][1]

    def title(self, row: ChatRow) -> str:
        return self.user_turn(row)

    def axolotl_settings(self) -> dict[str, Any]:
        # eot_tokens: the end-of-turn token carries the loss (train_on_eos) even where it is not the tokenizer's EOS
        # (a Llama 3 base: EOS <|end_of_text|>, turns end with <|eot_id|>), so the model learns to stop there.
        return {"chat_template": self.chat.axolotl, "eot_tokens": [self.chat.end_of_turn]}

    def axolotl_dataset(self, spec: Any, path: Path | None) -> dict[str, Any]:
        s = self.shape
        src = {"path": str(path), "ds_type": "json"} if not spec.hub else {"path": spec.hub, "split": spec.hub_split}
        roles: dict[str, list[str]] = {}
        for theirs, ours in s.roles.items():
            roles.setdefault(ours, []).append(theirs)
        return {**src, "type": "chat_template", "field_messages": spec.fields.get("messages", s.field),
                "message_property_mappings": {"role": s.role, "content": s.content}, "roles": roles,
                "roles_to_train": list(spec.roles_to_train), "train_on_eos": spec.train_on_eos}


def chat_format(shape_name: str, chat: ChatTemplate) -> Chat:
    return Chat(SHAPES[shape_name], chat)
