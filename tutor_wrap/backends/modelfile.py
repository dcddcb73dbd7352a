"""Write and check Ollama Modelfiles without needing an Ollama binary.

The grammar below follows Ollama's own parser (github.com/ollama/ollama, ``parser/parser.go`` and the option
types in ``api/types.go``, read at commit fb30760996871fa9460115c753afd2c60d4ab0f7). What that parser does:

* A line is ``KEYWORD value``. The keyword is ASCII letters in any case, and one space or tab follows it.
  The keywords are FROM ADAPTER TEMPLATE SYSTEM PARAMETER LICENSE MESSAGE, plus REQUIRES PARSER RENDERER
  DRAFT in newer versions. ``PARAMETER`` is followed by ``name value`` and ``MESSAGE`` by ``role value``,
  with exactly one separator after the keyword.
* ``#`` starts a comment only where a command could start. Inside a value it is ordinary text.
* A value runs to the end of the line unless it is quoted, and there are **no escape sequences**. ``\\``
  and ``\\"`` are literal text. A value ends at the first CR or LF where the text so far, stripped of
  surrounding whitespace, is complete. Text that starts with ``\"\"\"`` is complete when it is at least 6
  characters long and ends with ``\"\"\"``. Text that starts with ``"`` is complete when it is at least 2
  characters long and ends with ``"``. Anything else is always complete. The quotes are then removed.
  Quoted values can span lines. Unquoted values are stripped.
* Non-printable runes (anything but letters, marks, numbers, punctuation, symbols, space, tab, CR and LF)
  are dropped without a word. Text that needs them cannot go through a Modelfile.

From this, quoting a text ``s`` works as follows. ``\"\"\"s\"\"\"`` gives back ``s`` unless ``s`` holds
``\"\"\"`` followed by optional spaces or tabs and then a line break: there the value would stop early.
``"s"`` breaks in every case where the triple form breaks, and in more. So such text, or text with
non-printable characters, cannot be written at all, and :func:`render` raises :class:`ModelfileError`
rather than emit a file that Ollama would read differently.

This module is stricter than Ollama on purpose, so mistakes surface here and not at ``ollama create``:
only one FROM; no repeated TEMPLATE, SYSTEM, ADAPTER or non-``stop`` parameter (Ollama keeps the last one
without saying so); no non-printable characters outside comments (Ollama drops them); no deprecated
parameters (Ollama ignores them); floats must be finite decimals (Go also takes hex, inf and nan); a
path-like FROM must be an existing file (Ollama would pull a missing one as a model name); no empty
TEMPLATE or ``stop`` values.
"""

from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from tutor_wrap.core.errors import TutorWrapError

# --- grammar tables (parser/parser.go isValidCommand / isValidMessageRole; api/types.go Options+Runner) ---

COMMANDS = frozenset(
    {"from", "adapter", "template", "system", "parameter", "license", "message",
     "requires", "parser", "renderer", "draft"}
)
MESSAGE_ROLES = frozenset({"system", "user", "assistant"})

INT_PARAMETERS = frozenset(
    {"num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "draft_num_predict",
     "num_keep", "seed", "num_predict", "top_k", "repeat_last_n"}
)
FLOAT_PARAMETERS = frozenset(
    {"top_p", "min_p", "typical_p", "temperature", "repeat_penalty", "presence_penalty", "frequency_penalty"}
)
BOOL_PARAMETERS = frozenset({"use_mmap"})
STRING_LIST_PARAMETERS = frozenset({"stop"})
KNOWN_PARAMETERS = INT_PARAMETERS | FLOAT_PARAMETERS | BOOL_PARAMETERS | STRING_LIST_PARAMETERS
# Ollama prints "warning: parameter X is deprecated" and drops these; we reject them.
DEPRECATED_PARAMETERS = frozenset(
    {"penalize_newline", "low_vram", "f16_kv", "logits_all", "vocab_only", "use_mlock",
     "mirostat", "mirostat_tau", "mirostat_eta"}
)

# Commands where a second occurrence silently replaces the first in Ollama.
_SINGLE_COMMANDS = ("from", "template", "system", "adapter", "requires", "parser", "renderer")

_SEP = frozenset(" \t")     # what the parser treats as a space
_EOL = frozenset("\r\n")    # both end a line for the parser
_WS = _SEP | _EOL
_TRIPLE = '"""'

_INT_RE = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_GO_BOOLS = {"1": True, "t": True, "T": True, "true": True, "TRUE": True, "True": True,
             "0": False, "f": False, "F": False, "false": False, "FALSE": False, "False": False}
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class ModelfileError(TutorWrapError, ValueError):
    """A Modelfile that Ollama would reject or read differently from what was meant.

    ``line`` is the 1-based line of the Modelfile, or None for errors raised by :func:`render`,
    which instead name the field of :class:`ModelfileSpec`.
    """

    def __init__(self, problem: str, *, line: int | None = None, fix: str | None = None):
        self.line = line
        self.problem = problem
        super().__init__(f"line {line}: {problem}" if line is not None else problem, hint=fix)


@dataclass(frozen=True)
class Command:
    """One command, with its value unquoted exactly as Ollama would see it.

    ``name`` is the lower-cased keyword (``"from"``, ``"parameter"``, ``"message"``, ...). ``key`` is the
    parameter name for PARAMETER and the role for MESSAGE, otherwise None. ``line`` is where the keyword is.
    """

    name: str
    args: str
    line: int
    key: str | None = None


@dataclass(frozen=True)
class ModelfileSpec:
    from_path: str                 # GGUF path relative to the Modelfile's directory, e.g. "./model-Q4_K_M.gguf"
    template: str                  # Go text/template source
    system: str | None = None
    parameters: tuple[tuple[str, object], ...] = ()   # ("num_ctx", 256), ("temperature", 0.2) ...
    stops: tuple[str, ...] = ()    # each becomes `PARAMETER stop "..."`


# --------------------------------------------------------------------------------------------- parsing


def _printable(ch: str) -> bool:
    # Python's isprintable() and Go's unicode.IsPrint draw the same line: categories L, M, N, P, S plus U+0020.
    return ch.isprintable() or ch == "\t"


class _Reader:
    """Walks the text and keeps track of line numbers. CRLF counts as one line break."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0
        self.line = 1

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def advance(self) -> str:
        ch = self.text[self.pos]
        self.pos += 1
        if ch == "\n" or (ch == "\r" and self.peek() != "\n"):
            self.line += 1
        return ch

    def word(self, allowed) -> str:
        start = self.pos
        while self.pos < len(self.text) and allowed(self.text[self.pos]):
            self.pos += 1
        return self.text[start:self.pos]


def _is_letter(ch: str) -> bool:
    return ("a" <= ch <= "z") or ("A" <= ch <= "Z")


def _is_param_char(ch: str) -> bool:
    return _is_letter(ch) or ("0" <= ch <= "9") or ch == "_"


def _complete(text: str, lead: int, end: int) -> str | None:
    """The unquoted value if ``text[lead:end]`` (already stripped) is a finished value, else None."""
    n = end - lead
    if text.startswith(_TRIPLE, lead) and n >= 3:
        if n >= 6 and text.endswith(_TRIPLE, lead, end):
            return text[lead + 3:end - 3]
        return None
    if n >= 1 and text[lead] == '"':
        if n >= 2 and text[end - 1] == '"':
            return text[lead + 1:end - 1]
        return None
    return text[lead:end]


def _describe(ch: str) -> str:
    return f"U+{ord(ch):04X}"


def _read_value(r: _Reader, keyword: str, start_line: int) -> str:
    """Read one value, starting just after its separator, and leave ``r`` on the line break that ends it."""
    text = r.text
    lead = -1  # index of the first non-blank character of the value
    while True:
        ch = r.peek()
        if ch == "" or ch in _EOL:  # end of a line or of the text
            end = r.pos
            if lead < 0:
                return ""
            while end > lead and text[end - 1] in _WS:
                end -= 1
            value = _complete(text, lead, end)
            if value is not None:
                return value
            if ch == "":
                form = _TRIPLE if text.startswith(_TRIPLE, lead) else '"'
                raise ModelfileError(
                    f"{keyword.upper()} value opened with {form} is never closed",
                    line=start_line,
                    fix=f"end the value with {form} as the last thing on a line "
                        f"(the Modelfile syntax has no escapes, so text after the closing quotes reopens the value)",
                )
        elif not _printable(ch):
            raise ModelfileError(
                f"{keyword.upper()} value contains the non-printable character {_describe(ch)}, "
                f"which Ollama silently drops",
                line=r.line,
                fix="remove the character (or use a printable one)",
            )
        elif lead < 0 and ch not in _SEP:
            lead = r.pos
        r.advance()


def parse(text: str) -> list[Command]:
    """Parse Modelfile ``text`` the way Ollama's parser does, and return the commands with unquoted values.

    Raises :class:`ModelfileError` (naming the line) on anything Ollama's parser rejects, including a missing
    FROM, and on non-printable characters outside comments, which Ollama would silently drop.
    """
    if text.startswith("\ufeff"):
        text = text[1:]
    r = _Reader(text)
    commands: list[Command] = []
    while True:
        ch = r.peek()
        if ch == "":
            break
        if ch in _WS:
            r.advance()
            continue
        if ch == "#":
            while r.peek() not in ("", "\r", "\n"):
                r.advance()
            continue
        if not _printable(ch):
            raise ModelfileError(
                f"stray non-printable character {_describe(ch)} before a command",
                line=r.line, fix="delete it",
            )

        line = r.line
        word = r.word(_is_letter)
        after = r.peek()
        keyword = word.lower()
        if not word or not (after == "" or after in _SEP or after in _EOL):
            bad = word + r.word(lambda c: c not in _WS)
            raise ModelfileError(
                f"unknown command {bad!r}",
                line=line,
                fix="commands are FROM, ADAPTER, TEMPLATE, SYSTEM, PARAMETER, LICENSE, MESSAGE, "
                    "REQUIRES, PARSER, RENDERER or DRAFT, followed by a space and a value; "
                    "comments start with '#'",
            )
        if keyword not in COMMANDS:
            raise ModelfileError(
                f"unknown command {word!r}",
                line=line,
                fix="commands are FROM, ADAPTER, TEMPLATE, SYSTEM, PARAMETER, LICENSE, MESSAGE, "
                    "REQUIRES, PARSER, RENDERER or DRAFT (any case); comments start with '#'",
            )
        if after == "" or after not in _SEP:
            raise ModelfileError(
                f"{word} has no value",
                line=line,
                fix=f"write '{keyword.upper()} <value>' on one line (quote empty text as \"\")",
            )
        r.advance()  # the single separator after the keyword

        key: str | None = None
        if keyword in ("parameter", "message"):
            allowed = _is_param_char if keyword == "parameter" else _is_letter
            what = "parameter name" if keyword == "parameter" else "role"
            key = r.word(allowed)
            nxt = r.peek()
            if not key:
                raise ModelfileError(
                    f"{word} is missing its {what} right after the keyword",
                    line=line,
                    fix=f"write '{keyword.upper()} <{what}> <value>' with exactly one space after "
                        f"{keyword.upper()}",
                )
            if nxt == "" or nxt not in _SEP:
                if nxt == "" or nxt in _EOL:
                    problem = f"{word} {key} has no value"
                    fix = f"write '{keyword.upper()} {key} <value>' on one line"
                else:
                    problem = f"invalid character {nxt!r} in {what} {key + nxt!r}"
                    fix = ("parameter names use letters, digits and '_'" if keyword == "parameter"
                           else "roles are system, user or assistant")
                raise ModelfileError(problem, line=line, fix=fix)
            if keyword == "message" and key not in MESSAGE_ROLES:
                raise ModelfileError(
                    f"MESSAGE role {key!r} is not allowed",
                    line=line, fix="use one of system, user, assistant (lower case)",
                )
            r.advance()

        value = _read_value(r, keyword, line)
        commands.append(Command(name=keyword, args=value, line=line, key=key))

    if not any(c.name == "from" for c in commands):
        raise ModelfileError(
            "no FROM command", line=1,
            fix="add 'FROM ./model.gguf' (a path relative to the Modelfile, or a model name)",
        )
    return commands


# --------------------------------------------------------------------------------------------- quoting


def _parses_back(value_text: str) -> str | None:
    """What the parser would read from ``value_text`` as a whole value, or None if it reads something else."""
    r = _Reader(value_text + "\n")
    try:
        got = _read_value(r, "value", 1)
    except ModelfileError:
        return None
    return got if r.pos == len(value_text) else None


def quote_value(text: str, *, prefer: str = "triple", what: str = "value") -> str:
    """Return ``text`` written so that Ollama's parser reads back exactly ``text``.

    ``prefer`` picks the form tried first: ``"triple"`` (\"\"\"...\"\"\"), ``"double"`` ("...") or
    ``"plain"``. The other forms are tried next. Raises :class:`ModelfileError` if no form works, which
    happens only for non-printable characters or for ``\"\"\"`` right before a line break.
    """
    for i, ch in enumerate(text):
        if not _printable(ch) and ch not in _EOL:
            raise ModelfileError(
                f"{what} contains the non-printable character {_describe(ch)} at offset {i}; "
                "Ollama's Modelfile parser drops such characters, so it cannot be written",
                fix="remove or replace the character",
            )
    forms = {"triple": _TRIPLE + text + _TRIPLE, "double": '"' + text + '"', "plain": text}
    order = {"triple": ("triple", "double", "plain"), "double": ("double", "triple", "plain"),
             "plain": ("plain", "double", "triple")}[prefer]
    for form in order:
        candidate = forms[form]
        if _parses_back(candidate) == text:
            return candidate
    m = re.search(r'"""[ \t]*[\r\n]', text)
    where = f" at offset {m.start()}" if m else ""
    raise ModelfileError(
        f"{what} has '\"\"\"' at the end of a line{where}; a Modelfile has no escape sequences, "
        "so no quoting can carry this text",
        fix='put a character other than a space after the """ on that line, or rephrase the text',
    )


# --------------------------------------------------------------------------------------------- typed values


def _check_int(raw: str) -> int | None:
    if not _INT_RE.fullmatch(raw):
        return None
    value = int(raw)
    return value if _INT64_MIN <= value <= _INT64_MAX else None


def _check_float(raw: str) -> float | None:
    if not _FLOAT_RE.fullmatch(raw):
        return None
    value = float(raw)
    if not math.isfinite(value):  # e.g. 1e400: Go reports a range error
        return None
    try:
        struct.pack("<f", value)  # Ollama parses with bitSize 32; past float32 range is an error there
    except OverflowError:
        return None
    return value


def _typed_problem(name: str, raw: str) -> tuple[str, str] | None:
    """(problem, fix) if ``raw`` is not a valid value for parameter ``name``, else None."""
    if name in INT_PARAMETERS:
        if _check_int(raw) is None:
            return (f"PARAMETER {name} needs an integer, got {raw!r}",
                    f"write e.g. 'PARAMETER {name} 4096' (decimal digits, optional sign, 64-bit range)")
    elif name in FLOAT_PARAMETERS:
        if _check_float(raw) is None:
            return (f"PARAMETER {name} needs a number, got {raw!r}",
                    f"write e.g. 'PARAMETER {name} 0.7' (finite decimal, float32 range)")
    elif name in BOOL_PARAMETERS:
        if raw not in _GO_BOOLS:
            return (f"PARAMETER {name} needs true or false, got {raw!r}",
                    f"write 'PARAMETER {name} true' or 'PARAMETER {name} false'")
    elif name in STRING_LIST_PARAMETERS:
        if raw == "":
            return (f"PARAMETER {name} is empty", "give a non-empty stop string or drop the line")
    return None


def _unknown_parameter(name: str) -> tuple[str, str]:
    if name in DEPRECATED_PARAMETERS:
        return (f"parameter {name!r} is deprecated and ignored by Ollama", "remove it")
    import difflib

    known = ", ".join(sorted(KNOWN_PARAMETERS))
    near = difflib.get_close_matches(name, sorted(KNOWN_PARAMETERS), n=1)
    return (f"unknown parameter {name!r}", (f"did you mean {near[0]!r}? " if near else "") + f"use one of: {known}")


def _format_parameter(name: str, value: object) -> str:
    where = f"ModelfileSpec.parameters[{name!r}]"
    if name not in KNOWN_PARAMETERS:
        problem, fix = _unknown_parameter(name)
        raise ModelfileError(f"{where}: {problem}", fix=fix)
    if name in STRING_LIST_PARAMETERS:
        if not isinstance(value, str):
            raise ModelfileError(f"{where}: stop must be a str, got {type(value).__name__}",
                                 fix="pass stop strings as str (or in ModelfileSpec.stops)")
        return quote_value(value, prefer="double", what=where)
    if isinstance(value, bool):
        if name not in BOOL_PARAMETERS:
            raise ModelfileError(f"{where}: got a bool for a numeric parameter", fix="pass a number")
        raw = "true" if value else "false"
    elif isinstance(value, int):
        if name in BOOL_PARAMETERS:
            raise ModelfileError(f"{where}: needs a bool, got {value!r}", fix="pass True or False")
        raw = str(value)
    elif isinstance(value, float):
        if name not in FLOAT_PARAMETERS:
            raise ModelfileError(f"{where}: needs an int, got float {value!r}", fix="pass an int")
        if not math.isfinite(value):
            raise ModelfileError(f"{where}: {value!r} is not finite", fix="pass a finite number")
        raw = repr(value)
    elif isinstance(value, str):
        raw = value
    else:
        raise ModelfileError(f"{where}: unsupported value type {type(value).__name__}",
                             fix="pass an int, float, bool or str")
    bad = _typed_problem(name, raw)
    if bad:
        raise ModelfileError(f"{where}: {bad[0]}", fix=bad[1])
    return raw


# --------------------------------------------------------------------------------------------- render


def render(spec: ModelfileSpec) -> str:
    """Write ``spec`` as Modelfile text. ``parse(render(spec))`` gives back the spec's texts exactly."""
    if not spec.from_path:
        raise ModelfileError("ModelfileSpec.from_path is empty", fix="give the GGUF path, e.g. './model.gguf'")
    if not spec.template.strip():
        raise ModelfileError("ModelfileSpec.template is empty",
                             fix="give the prompt template the model was trained with")

    lines = [
        "FROM " + quote_value(spec.from_path, prefer="plain", what="ModelfileSpec.from_path"),
        "TEMPLATE " + quote_value(spec.template, what="ModelfileSpec.template"),
    ]
    if spec.system is not None:
        lines.append("SYSTEM " + quote_value(spec.system, what="ModelfileSpec.system"))
    seen: set[str] = set()
    for name, value in spec.parameters:
        if name in seen and name not in STRING_LIST_PARAMETERS:
            raise ModelfileError(f"ModelfileSpec.parameters sets {name!r} twice",
                                 fix="keep one value (Ollama would silently use the last)")
        seen.add(name)
        lines.append(f"PARAMETER {name} {_format_parameter(name, value)}")
    for i, stop in enumerate(spec.stops):
        where = f"ModelfileSpec.stops[{i}]"
        if not isinstance(stop, str) or stop == "":
            raise ModelfileError(f"{where} must be a non-empty str, got {stop!r}", fix="drop it or fill it in")
        lines.append("PARAMETER stop " + quote_value(stop, prefer="double", what=where))
    text = "\n".join(lines) + "\n"
    _self_check(spec, text)
    return text


def _self_check(spec: ModelfileSpec, text: str) -> None:
    # Cheap insurance: the emitted file must parse back to exactly the texts we were given.
    cmds = parse(text)
    got = {c.name: c.args for c in cmds if c.name in ("from", "template", "system")}
    want = {"from": spec.from_path, "template": spec.template}
    if spec.system is not None:
        want["system"] = spec.system
    stops = [c.args for c in cmds if c.name == "parameter" and c.key == "stop"]
    want_stops = [v for k, v in spec.parameters if k == "stop"] + list(spec.stops)
    if got != want or stops != want_stops:
        raise ModelfileError("internal error: rendered Modelfile does not parse back to the spec",
                             fix="report this with the spec that triggered it")


# --------------------------------------------------------------------------------------------- validate


def _looks_like_path(value: str) -> bool:
    prefixes = ("./", "../", "/", "~", ".\\", "..\\", "\\")
    return value in (".", "..") or value.startswith(prefixes) or value.lower().endswith(".gguf")


def _resolve(value: str, base_dir: Path) -> Path:
    # Mirrors Ollama's expandPath: absolute stays, ~ and ~user expand, anything else is relative to the
    # Modelfile's directory.
    if value.startswith("~"):
        return Path(os.path.expanduser(value))
    p = Path(value)
    return p if p.is_absolute() else Path(base_dir) / p


def validate(text: str, base_dir: Path) -> list[Command]:
    """Parse ``text`` and check the commands tutor_wrap writes as Ollama checks them at create time, plus a few
    stricter rules.

    ``base_dir`` is the directory the Modelfile lives in; relative paths are resolved against it.
    """
    commands = parse(text)
    first: dict[str, Command] = {}
    first_param: dict[str, Command] = {}

    for cmd in commands:
        if cmd.name in _SINGLE_COMMANDS:
            if cmd.name in first:
                prev = first[cmd.name]
                raise ModelfileError(
                    f"second {cmd.name.upper()} (the first is on line {prev.line})",
                    line=cmd.line,
                    fix=f"keep exactly one {cmd.name.upper()} line",
                )
            first[cmd.name] = cmd

        if cmd.name == "from":
            if cmd.args == "":
                raise ModelfileError("FROM is empty", line=cmd.line, fix="write 'FROM ./model.gguf'")
            if _looks_like_path(cmd.args):
                target = _resolve(cmd.args, base_dir)
                if target.is_dir():
                    raise ModelfileError(
                        f"FROM {cmd.args} is a directory ({target})", line=cmd.line,
                        fix="point FROM at the .gguf file itself",
                    )
                if not target.is_file():
                    raise ModelfileError(
                        f"FROM file {cmd.args} does not exist (looked for {target})", line=cmd.line,
                        fix="fix the path (relative to the Modelfile's directory); "
                            "otherwise Ollama would try to pull it as a model name",
                    )
        elif cmd.name == "template":
            if not cmd.args.strip():
                raise ModelfileError("TEMPLATE is empty", line=cmd.line,
                                     fix="write the prompt template the model was trained with, or drop the line")
        elif cmd.name == "parameter":
            name = cmd.key or ""
            if name not in KNOWN_PARAMETERS:
                problem, fix = _unknown_parameter(name)
                raise ModelfileError(problem, line=cmd.line, fix=fix)
            bad = _typed_problem(name, cmd.args)
            if bad:
                raise ModelfileError(bad[0], line=cmd.line, fix=bad[1])
            if name not in STRING_LIST_PARAMETERS:
                if name in first_param:
                    raise ModelfileError(
                        f"second PARAMETER {name} (the first is on line {first_param[name].line})",
                        line=cmd.line, fix="keep one (Ollama would silently use the last)",
                    )
                first_param[name] = cmd
        # tutor_wrap writes FROM, TEMPLATE, SYSTEM and PARAMETER; parse() reads the rest of Ollama's grammar,
        # and any other command's value is taken as Ollama takes it
    return commands
