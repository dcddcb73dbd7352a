"""Tests for tutor_wrap.backends.modelfile: quoting round trips, Ollama parser fidelity, rejection with line numbers.

``_ollama_model`` below models ollama/ollama parser/parser.go ParseFile (commit fb3076099687) one rune at a
time, as a separate implementation. It is structured like the Go state machine and unlike our line-oriented
parser, so fuzzed inputs can check that both read the same commands.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from tutor_wrap.backends.modelfile import (
    Command,
    ModelfileError,
    ModelfileSpec,
    parse,
    quote_value,
    render,
    validate,
)

pytestmark = pytest.mark.unit

try:  # hypothesis is a dev extra; the seeded fuzz below runs either way
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

ALPACA = (
    "{{ if .System }}{{ .System }}\n\n{{ end }}### Instruction:\n{{ .Prompt }}\n\n### Response:\n{{ .Response }}"
)
CHATML = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)

# Text that no Modelfile can carry (see the module docstring): """ then optional blanks then a line break.
UNREPRESENTABLE = re.compile(r'"""[ \t]*[\r\n]')


# ----------------------------------------------------------------------------- a model of Ollama's parser


class _OllamaRejects(Exception):
    pass


def _ollama_unquote(s: str) -> str | None:
    if s[:3] == '"""':
        return s[3:-3] if len(s) >= 6 and s.endswith('"""') else None
    if s[:1] == '"':
        return s[1:-1] if len(s) >= 2 and s.endswith('"') else None
    return s


def _ollama_model(text: str) -> list[tuple[str, str]]:
    """(name, args) pairs shaped as Ollama's Command: FROM is "model", PARAMETER is its own name, and
    MESSAGE args are "role: text". An empty parameter name (two spaces after PARAMETER) is counted as a
    rejection, because Ollama's create step fails on it ("unknown parameter ''")."""
    NIL, NAME, VALUE, PARAM, MSG, COMMENT = range(6)
    commands = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser",
                "parameter", "message", "requires"}
    state, buf, name, role, out = NIL, [], "", "", []
    blank, eol = " \t", "\r\n"
    if text.startswith("\ufeff"):
        text = text[1:]
    for ch in text:
        keep = ch
        if state == NIL:
            nxt = COMMENT if ch == "#" else NIL if ch in blank + eol else NAME
            if nxt != NAME:
                keep = ""
        elif state == NAME:
            if ch.isascii() and ch.isalpha():
                nxt = NAME
            elif ch in blank:
                nxt, keep = VALUE, ""
            else:
                raise _OllamaRejects("invalid command")
        elif state == VALUE:
            nxt = NIL if ch in blank + eol else VALUE
        elif state in (PARAM, MSG):
            ok = ch.isascii() and (ch.isalpha() or (state == PARAM and (ch.isdigit() or ch == "_")))
            if ok:
                nxt = state
            elif ch in blank:
                nxt, keep = VALUE, ""
            else:
                raise _OllamaRejects("bad parameter name or role")
        else:  # COMMENT
            nxt, keep = (NIL if ch in eol else COMMENT), ""

        if nxt != state:
            word = "".join(buf)
            if state == NAME:
                low = word.lower()
                if low not in commands:
                    raise _OllamaRejects("invalid command")
                if low == "parameter":
                    nxt = PARAM
                elif low == "message":
                    nxt, name = MSG, low
                else:
                    name = "model" if low == "from" else low
            elif state == PARAM:
                if not word:
                    raise _OllamaRejects("unknown parameter ''")
                name = word
            elif state == MSG:
                if word not in ("system", "user", "assistant"):
                    raise _OllamaRejects("invalid role")
                role = word
            elif state == VALUE:
                value = _ollama_unquote(word.strip(blank + eol))
                if value is None or ch in blank:
                    buf.append(ch)
                    continue
                out.append((name, f"{role}: {value}" if role else value))
                role = ""
            buf = []
            state = nxt
        if keep and keep.isprintable():
            buf.append(keep)

    if state == VALUE:
        value = _ollama_unquote("".join(buf).strip(blank + eol))
        if value is None:
            raise _OllamaRejects("unexpected EOF")
        out.append((name, f"{role}: {value}" if role else value))
    elif state not in (NIL, COMMENT):
        raise _OllamaRejects("unexpected EOF")
    if not any(n == "model" for n, _ in out):
        raise _OllamaRejects("no FROM line")
    return out


def _as_ollama(commands: list[Command]) -> list[tuple[str, str]]:
    shaped = []
    for c in commands:
        if c.name == "from":
            shaped.append(("model", c.args))
        elif c.name == "parameter":
            shaped.append((c.key, c.args))
        elif c.name == "message":
            shaped.append(("message", f"{c.key}: {c.args}"))
        else:
            shaped.append((c.name, c.args))
    return shaped


# ----------------------------------------------------------------------------- nasty strings

NASTY = [
    "",
    " ",
    "\n",
    "\r\n",
    "\t",
    '"',
    '""',
    '"""',
    '""""',
    '"""""',
    '""""""',
    '"""x"""',
    'a"""b',
    '"""\t x',
    '\\',
    '\\"',
    '\\\\"',
    '\\n',
    '"\\"',
    "# not a comment",
    "\n# not a comment either\nFROM evil\n",
    "x\nFROM ./other.gguf\nSYSTEM pwned",
    "  leading and trailing  ",
    "\n\nleading newlines",
    "trailing newlines\n\n",
    "line one\r\nline two\rline three",
    "ünïcödé ✓ 漢字 🙂 שלום",
    "'single' quotes '''",
    '"quoted"',
    'ends with quote"',
    '"starts with quote',
    'quote then newline"\nmore',
    'quote then spaces then newline"  \nmore',
    '""\n',
    '"\n"',
    "{{ .Prompt }}",
    ALPACA,
    CHATML,
    '"""' + ALPACA + '"""',
    "<|im_end|>",
    "### Instruction:",
    "</s>",
    "SYSTEM",
    "PARAMETER stop x",
]

# Pieces for random concatenation: the characters and fragments the quoting rules react to.
PIECES = ['"', '"""', '""', "\\", "\n", "\r", "\r\n", " ", "\t", "#", "x", "é", "🙂", "{{ .Prompt }}",
          "FROM y", "SYSTEM", "'", "~", "a b"]


def _random_texts(seed: int, count: int, max_pieces: int = 12) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(0, max_pieces))) for _ in range(count)]


def _check_round_trip(text: str) -> None:
    """``text`` comes back exactly from every free-text field, or render refuses it (and only then)."""
    if UNREPRESENTABLE.search(text):
        with pytest.raises(ModelfileError):
            render(ModelfileSpec(from_path="./m.gguf", template=text or "x", system=text))
        return
    stop_ok = text != ""
    spec = ModelfileSpec(
        from_path="./m.gguf",
        template=text if text.strip() else "{{ .Prompt }}",
        system=text,
        stops=(text,) if stop_ok else (),
    )
    rendered = render(spec)
    cmds = parse(rendered)
    assert [c.args for c in cmds if c.name == "system"] == [text]
    assert [c.args for c in cmds if c.name == "template"] == [spec.template]
    assert [c.args for c in cmds if c.name == "parameter" and c.key == "stop"] == list(spec.stops)
    # And the independent model of Ollama's parser reads the very same values.
    assert _ollama_model(rendered) == _as_ollama(cmds)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("text", NASTY, ids=range(len(NASTY)))
def test_round_trip_nasty(text):
    _check_round_trip(text)


@pytest.mark.parametrize("seed", range(8))
def test_round_trip_random(seed):
    for text in _random_texts(seed, 400):
        _check_round_trip(text)


if given is not None:

    @settings(max_examples=400, deadline=None)
    @given(st.text(alphabet=st.sampled_from(['"', "\\", "\n", "\r", " ", "\t", "#", "a", "é", "{", "}"])))
    def test_round_trip_hypothesis_focused(text):
        _check_round_trip(text)

    @settings(max_examples=300, deadline=None)
    @given(st.text(st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"))
                   | st.sampled_from([" ", "\t", "\n", "\r", '"'])))
    def test_round_trip_hypothesis_unicode(text):
        _check_round_trip(text)


@pytest.mark.parametrize("text", ['x"""\ny', 'x"""  \ny', 'x"""\t\r\nz', '"""\n', 'a\n"""\nb'])
def test_unrepresentable_text_is_refused(text):
    with pytest.raises(ModelfileError, match='"""'):
        render(ModelfileSpec(from_path="./m.gguf", template="{{ .Prompt }}", system=text))


@pytest.mark.parametrize("char", ["\x00", "\x1b", "\x0b", "\x0c", "\u00a0", "\u200b", "\u2028", "\ufeff", "\x85"])
def test_non_printable_text_is_refused(char):
    # Ollama's parser drops these runes silently, so they can't survive a Modelfile.
    with pytest.raises(ModelfileError, match=f"U\\+{ord(char):04X}"):
        render(ModelfileSpec(from_path="./m.gguf", template="{{ .Prompt }}", system=f"a{char}b"))


def test_quote_forms():
    assert quote_value("./model.gguf", prefer="plain") == "./model.gguf"
    assert quote_value("./my model.gguf", prefer="plain") == "./my model.gguf"
    assert quote_value(" padded", prefer="plain") == '" padded"'
    assert quote_value("<|im_end|>", prefer="double") == '"<|im_end|>"'
    assert quote_value('"', prefer="double") == '"""' + '"' + '"""'
    assert quote_value("a\nb") == '"""a\nb"""'
    assert quote_value("") == '""""""'
    # Backslashes are literal in Ollama: nothing is escaped, nothing is unescaped.
    assert quote_value('a\\"b', prefer="double") == '"a\\"b"'


# ----------------------------------------------------------------------------- parser fidelity


# Cases from ollama/ollama parser/parser_test.go (TestParseFileQuoted, TestParseFileParameters), restated.
OLLAMA_QUOTED = [
    ('FROM foo\nSYSTEM """\nThis is a\nmultiline system.\n"""\n', "\nThis is a\nmultiline system.\n"),
    ('FROM foo\nSYSTEM """\nThis is a\nmultiline system."""\n', "\nThis is a\nmultiline system."),
    ('FROM foo\nSYSTEM """This is a\nmultiline system."""\n', "This is a\nmultiline system."),
    ('FROM foo\nSYSTEM """This is a multiline system."""\n', "This is a multiline system."),
    ('FROM foo\nSYSTEM """\nThis is a multiline system with "quotes".\n"""\n',
     '\nThis is a multiline system with "quotes".\n'),
    ('FROM foo\nSYSTEM """"""\n', ""),
    ('FROM foo\nSYSTEM ""\n', ""),
    ("FROM foo\nSYSTEM \"'\"\n", "'"),
    ('FROM foo\nSYSTEM """\'\'"\'""\'""\'"\'\'\'\'\'""\'""\'"""\n', '\'\'"\'""\'""\'"\'\'\'\'\'""\'""\''),
]


@pytest.mark.parametrize("text,system", OLLAMA_QUOTED)
def test_ollama_quoted_cases(text, system):
    cmds = parse(text)
    assert [(c.name, c.args) for c in cmds] == [("from", "foo"), ("system", system)]
    assert _ollama_model(text) == _as_ollama(cmds)


def test_ollama_template_at_eof_without_newline():
    cmds = parse('FROM foo\nTEMPLATE """\n{{ .Prompt }}\n"""')
    assert cmds[1] == Command("template", "\n{{ .Prompt }}\n", 2)


@pytest.mark.parametrize(
    "line,value",
    [
        ("stop ### User:", "### User:"),
        ("stop ### User: ", "### User:"),
        ('stop "### User:"', "### User:"),
        ('stop "### User: "', "### User: "),
        ('stop """### User:"""', "### User:"),
        ('stop """### User:\n"""', "### User:\n"),
        ("stop <|endoftext|>", "<|endoftext|>"),
        ("num_ctx 1", "1"),
        ("top_p 1.0", "1.0"),
        ("use_mmap true", "true"),
    ],
)
def test_ollama_parameter_cases(line, value):
    cmds = parse(f"FROM foo\nPARAMETER {line}\n")
    assert cmds[1].name == "parameter"
    assert cmds[1].key == line.split(" ", 1)[0]
    assert cmds[1].args == value


def test_grammar_details():
    text = (
        "\ufeff# leading comment\n"
        "   from ./m.gguf\n"
        "Template {{ .Prompt }} # this is part of the value\n"
        "\t# indented comment\n"
        'sYsTeM "multi\n# not a comment\nline"\n'
        "MESSAGE user Is Toronto in Canada?\n"
        "message assistant yes\n"
        "PARAMETER\tstop\t</s>\n"
        "LICENSE C:\\path\\with\\backslashes\n"
    )
    cmds = parse(text)
    assert cmds == [
        Command("from", "./m.gguf", 2),
        Command("template", "{{ .Prompt }} # this is part of the value", 3),
        Command("system", "multi\n# not a comment\nline", 5),
        Command("message", "Is Toronto in Canada?", 8, key="user"),
        Command("message", "yes", 9, key="assistant"),
        Command("parameter", "</s>", 10, key="stop"),
        Command("license", "C:\\path\\with\\backslashes", 11),
    ]
    assert _ollama_model(text) == _as_ollama(cmds)


def test_crlf_line_endings_and_line_numbers():
    text = 'FROM ./m.gguf\r\nSYSTEM """a\r\nb"""\r\nPARAMETER num_ctx 2k\r\n'
    cmds = parse(text)
    assert cmds[1].args == "a\r\nb"
    with pytest.raises(ModelfileError) as err:
        validate(text, Path("/nonexistent"))
    assert err.value.line == 1  # the FROM file is checked first, on line 1
    with pytest.raises(ModelfileError) as err:
        validate(text.replace("./m.gguf", "llama3.2"), Path("."))
    assert err.value.line == 4


def test_closing_quote_must_end_the_line():
    # Text after closing quotes reopens the value (Ollama behaves the same): it swallows the next lines.
    text = 'FROM foo\nSYSTEM "a" b\nPARAMETER stop "x"\n'
    cmds = parse(text)
    assert cmds[1].args == 'a" b\nPARAMETER stop "x'
    assert _ollama_model(text) == _as_ollama(cmds)


FUZZ_HEADS = ["FROM", "from", "SYSTEM", "Template", "license", "PARAMETER num_ctx", "PARAMETER stop",
              "PARAMETER", "MESSAGE user", "MESSAGE robot", "message", "REQUIRES", "bogus", "#", "  SYSTEM", ""]
FUZZ_SEPS = [" ", "  ", "\t", "", "\n", ":"]
FUZZ_BODY = ['"', '"""', '""', " ", "\t", "\n", "\r\n", "\r", "#", "x", "./m.gguf", "\\", "é", "1", "-", "_"]
FUZZ_EOLS = ["\n", "\r\n", "\r", "", " \n", '"\n', '"""\n']


def _fuzz_document(rng: random.Random) -> str:
    lines = ["FROM foo\n"] if rng.random() < 0.7 else []
    for _ in range(rng.randint(1, 6)):
        body = "".join(rng.choice(FUZZ_BODY) for _ in range(rng.randint(0, 6)))
        if rng.random() < 0.6:  # mostly well-formed lines, so that many documents are accepted
            lines.append(rng.choice(FUZZ_HEADS[:7]) + " " + body + "\n")
        else:
            lines.append(rng.choice(FUZZ_HEADS) + rng.choice(FUZZ_SEPS) + body + rng.choice(FUZZ_EOLS))
    rng.shuffle(lines)
    return "".join(lines)


@pytest.mark.parametrize("seed", range(6))
def test_parse_agrees_with_ollama_model_on_random_documents(seed):
    rng = random.Random(1000 + seed)
    accepted = 0
    for _ in range(1500):
        doc = _fuzz_document(rng)
        try:
            expected = _ollama_model(doc)
        except _OllamaRejects:
            expected = None
        try:
            got = _as_ollama(parse(doc))
        except ModelfileError:
            got = None
        assert got == expected, repr(doc)
        accepted += got is not None
    assert accepted > 100  # the fuzz must reach accepted documents, not only errors


# ----------------------------------------------------------------------------- rejections


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "adapters").mkdir()
    return tmp_path


INVALID = [
    # (name, text, line, fragment of the message)
    ("unterminated triple quote", 'FROM ./m.gguf\n\nSYSTEM """abc\nmore\n', 3, "never closed"),
    ("unterminated double quote", 'FROM ./m.gguf\nTEMPLATE "abc\n', 2, "never closed"),
    ("quote reopened by trailing text", 'FROM ./m.gguf\nSYSTEM "a" b\n', 2, "never closed"),
    ("unknown command", "FROM ./m.gguf\n# c\nINSTRUCTION hi\n", 3, "unknown command"),
    ("command glued to punctuation", "FROM ./m.gguf\nSYSTEM: hi\n", 2, "unknown command"),
    ("command without value", "FROM ./m.gguf\nSYSTEM\n", 2, "no value"),
    ("no FROM", "SYSTEM hi\nPARAMETER num_ctx 5\n", 1, "no FROM"),
    ("two FROMs", "FROM ./m.gguf\nSYSTEM hi\nfrom ./m.gguf\n", 3, "second FROM"),
    ("bad int num_ctx", "FROM ./m.gguf\nPARAMETER num_ctx 2k\n", 2, "integer"),
    ("float for num_ctx", "FROM ./m.gguf\nPARAMETER num_ctx 256.0\n", 2, "integer"),
    ("underscored int", "FROM ./m.gguf\nPARAMETER seed 1_000\n", 2, "integer"),
    ("int64 overflow", "FROM ./m.gguf\nPARAMETER seed 9223372036854775808\n", 2, "integer"),
    ("bad float temperature", "FROM ./m.gguf\nPARAMETER temperature warm\n", 2, "number"),
    ("comma decimal", "FROM ./m.gguf\nPARAMETER temperature 0,7\n", 2, "number"),
    ("nan temperature", "FROM ./m.gguf\nPARAMETER temperature nan\n", 2, "number"),
    ("float32 overflow", "FROM ./m.gguf\nPARAMETER top_p 1e39\n", 2, "number"),
    ("bad bool", "FROM ./m.gguf\nPARAMETER use_mmap yes\n", 2, "true or false"),
    ("unknown parameter", "FROM ./m.gguf\nPARAMETER num_ctxx 5\n", 2, "unknown parameter"),
    ("parameter names are case-sensitive", "FROM ./m.gguf\nPARAMETER NUM_CTX 5\n", 2, "unknown parameter"),
    ("deprecated parameter", "FROM ./m.gguf\nPARAMETER mirostat 1\n", 2, "deprecated"),
    ("two spaces after PARAMETER", "FROM ./m.gguf\nPARAMETER  num_ctx 5\n", 2, "missing its parameter name"),
    ("dash in parameter name", "FROM ./m.gguf\nPARAMETER num-ctx 5\n", 2, "invalid character"),
    ("parameter without value", "FROM ./m.gguf\nPARAMETER num_ctx\n", 2, "no value"),
    ("duplicate parameter", "FROM ./m.gguf\nPARAMETER num_ctx 5\nPARAMETER num_ctx 6\n", 3, "second PARAMETER"),
    ("empty stop", 'FROM ./m.gguf\nPARAMETER stop ""\n', 2, "empty"),
    ("missing FROM file", "# header\nFROM ./missing.gguf\n", 2, "does not exist"),
    ("missing absolute FROM file", "FROM /definitely/not/here.gguf\n", 1, "does not exist"),
    ("FROM is a directory", "FROM ./adapters\n", 1, "directory"),
    ("bad MESSAGE role", "FROM ./m.gguf\nMESSAGE bot hi\n", 2, "role"),
    ("MESSAGE role is case-sensitive", "FROM ./m.gguf\nMESSAGE User hi\n", 2, "role"),
    ("empty TEMPLATE", 'FROM ./m.gguf\nTEMPLATE """"""\n', 2, "TEMPLATE is empty"),
    ("two TEMPLATEs", "FROM ./m.gguf\nTEMPLATE a\nTEMPLATE b\n", 3, "second TEMPLATE"),
    ("non-printable in value", "FROM ./m.gguf\nSYSTEM a\x00b\n", 2, "U+0000"),
    ("non-printable in multiline value", 'FROM ./m.gguf\nSYSTEM """a\n\u200bb"""\n', 3, "U+200B"),
]


@pytest.mark.parametrize("text,line,fragment", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_modelfiles_are_rejected(model_dir, text, line, fragment):
    with pytest.raises(ModelfileError) as err:
        validate(text, model_dir)
    assert err.value.line == line
    assert str(err.value).startswith(f"line {line}: ")
    assert fragment in str(err.value)
    assert err.value.hint  # every error says what to do
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(
    "text",
    [
        "FROM llama3.2\n",  # a model name, not a path: Ollama pulls it
        "FROM ./m.gguf\nPARAMETER seed -1\nPARAMETER temperature .5\nPARAMETER top_p +1e-3\nPARAMETER use_mmap F\n",
        "FROM ./m.gguf\nPARAMETER stop a\nPARAMETER stop b\n",  # stop repeats by design
        "FROM ./m.gguf\nLICENSE a\nLICENSE b\n",
    ],
)
def test_valid_modelfiles_pass(model_dir, text):
    validate(text, model_dir)


def test_absolute_from_path(model_dir):
    validate(f"FROM {model_dir / 'm.gguf'}\n", Path("/"))


@pytest.mark.parametrize(
    "spec_kwargs,fragment",
    [
        ({"parameters": (("num_ctxx", 5),)}, "unknown parameter"),
        ({"parameters": (("num_ctx", True),)}, "bool"),
        ({"parameters": (("num_ctx", 256.0),)}, "needs an int"),
        ({"parameters": (("temperature", float("nan")),)}, "not finite"),
        ({"parameters": (("use_mmap", 1),)}, "needs a bool"),
        ({"parameters": (("num_ctx", 1), ("num_ctx", 2))}, "twice"),
        ({"parameters": (("num_ctx", "2 k"),)}, "integer"),
        ({"stops": ("",)}, "non-empty"),
        ({"template": "   "}, "template is empty"),
        ({"from_path": ""}, "from_path is empty"),
    ],
)
def test_render_rejects_bad_specs(spec_kwargs, fragment):
    kwargs = {"from_path": "./m.gguf", "template": "{{ .Prompt }}", **spec_kwargs}
    with pytest.raises(ModelfileError, match=re.escape(fragment)):
        render(ModelfileSpec(**kwargs))


# ----------------------------------------------------------------------------- a demo-like Modelfile


def test_rendered_demo_modelfile_validates(tmp_path):
    (tmp_path / "model-Q4_K_M.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    spec = ModelfileSpec(
        from_path="./model-Q4_K_M.gguf",
        template=ALPACA,
        system='You are a patient tutor. Say "I don\'t know" when unsure.\nUse C:\\paths and # freely.',
        parameters=(("num_ctx", 256), ("temperature", 0.2), ("top_p", 0.9), ("seed", 42), ("use_mmap", True)),
        stops=("### Instruction:", "### Response:", "</s>"),
    )
    text = render(spec)
    assert text.startswith("FROM ./model-Q4_K_M.gguf\n")
    assert 'PARAMETER stop "### Instruction:"\n' in text
    assert "PARAMETER num_ctx 256\n" in text
    assert "PARAMETER temperature 0.2\n" in text
    assert "PARAMETER use_mmap true\n" in text
    cmds = validate(text, tmp_path)
    by_name = {c.name: c.args for c in cmds if c.name != "parameter"}
    assert by_name == {"from": spec.from_path, "template": ALPACA, "system": spec.system}
    params = [(c.key, c.args) for c in cmds if c.name == "parameter"]
    assert params == [
        ("num_ctx", "256"), ("temperature", "0.2"), ("top_p", "0.9"), ("seed", "42"), ("use_mmap", "true"),
        ("stop", "### Instruction:"), ("stop", "### Response:"), ("stop", "</s>"),
    ]
    assert _ollama_model(text) == _as_ollama(cmds)
    # The file on disk validates the same way (the Modelfile's directory is the base for FROM).
    (tmp_path / "Modelfile").write_text(text, encoding="utf-8")
    assert validate((tmp_path / "Modelfile").read_text(encoding="utf-8"), tmp_path) == cmds


def test_deploy_keeps_the_users_num_ctx_and_adds_their_stops():
    from tutor_wrap.backends.ollama import build_spec
    from tutor_wrap.data.alpaca import ALPACA

    mine = build_spec(ALPACA, "./m.gguf", system=None, eos="</s>", num_ctx=192,
                      parameters={"num_ctx": 4096, "stop": ["END", "</s>"], "temperature": 0.2})
    assert dict(mine.parameters) == {"num_ctx": 4096, "temperature": 0.2}
    assert mine.stops[0] == "</s>" and "### Instruction:" in mine.stops and "END" in mine.stops
    assert len(mine.stops) == len(set(mine.stops))                  # the EOS the user repeated is listed once
    text = render(mine)
    assert "PARAMETER num_ctx 4096" in text and 'PARAMETER stop "END"' in text
    default = build_spec(ALPACA, "./m.gguf", system=None, eos=None, num_ctx=192, parameters={"stop": "END"})
    assert dict(default.parameters) == {"num_ctx": 192} and default.stops[-1] == "END"


def test_tutor_wrap_ollama_chooses_or_turns_off_the_ollama_binary(tmp_path, monkeypatch):
    from tutor_wrap.backends import ollama as ollama_backend
    from tutor_wrap.core.errors import TutorWrapError

    mf = tmp_path / "Modelfile"
    monkeypatch.setenv("TUTOR_WRAP_OLLAMA", "off")
    res = ollama_backend.create(mf, "tiny", "hi")
    assert res["status"] == "ready to create" and res["why"] == "TUTOR_WRAP_OLLAMA is off"
    assert res["commands"][0] == ["ollama", "create", "tiny", "-f", str(mf)]

    monkeypatch.setenv("TUTOR_WRAP_OLLAMA", str(tmp_path / "nope/ollama"))
    with pytest.raises(TutorWrapError, match="TUTOR_WRAP_OLLAMA=.*no such executable"):
        ollama_backend.create(mf, "tiny", "hi")

    # A stand-in for an ollama binary outside PATH (none can be installed here): the chosen one is the one run.
    calls = tmp_path / "calls.txt"
    exe = tmp_path / "bin/my-ollama"
    exe.parent.mkdir()
    exe.write_text(f"#!/bin/sh\necho \"$@\" >> '{calls}'\n")
    exe.chmod(0o755)
    monkeypatch.setenv("TUTOR_WRAP_OLLAMA", str(exe))
    res = ollama_backend.create(mf, "tiny", "hi")
    assert res["status"] == "created"
    assert calls.read_text().splitlines() == [f"create tiny -f {mf}", "run tiny hi"]

    # An ollama that fails without a word (no server, say): the error still says what ran and what to check.
    exe.write_text("#!/bin/sh\nexit 3\n")
    with pytest.raises(TutorWrapError, match="create` exited 3 and printed nothing") as err:
        ollama_backend.create(mf, "tiny", "hi")
    assert "ollama serve" in err.value.hint


def test_preflight_reports_a_bad_tutor_wrap_ollama_instead_of_crashing(tmp_path, monkeypatch):
    from tutor_wrap.machine import software

    monkeypatch.setenv("TUTOR_WRAP_OLLAMA", str(tmp_path / "nope/ollama"))
    v = software.collect()
    errors = [f for f in software.check_stack(v, "cpu") if f.severity == "error" and "TUTOR_WRAP_OLLAMA" in f.what]
    assert len(errors) == 1 and "no such executable" in errors[0].what and "unset it" in errors[0].fix
    monkeypatch.setenv("TUTOR_WRAP_OLLAMA", "off")
    v = software.collect()
    assert v["ollama"] is None and v["ollama_off"]
    assert any(f.severity == "info" and "TUTOR_WRAP_OLLAMA is off" in f.what for f in software.check_stack(v, "cpu"))
    monkeypatch.setenv("TUTOR_WRAP_OLLAMA", "")          # empty: as if unset
    assert software.collect().get("ollama_error") is None
