import json

import pytest

from tutor_wrap.data.alpaca import load_alpaca
from tutor_wrap.core.errors import TutorWrapError

pytestmark = pytest.mark.unit


def row(i="Explain x", o="Like this."):
    return json.dumps({"instruction": i, "input": "", "output": o})


def write(tmp_path, content: str | bytes):
    p = tmp_path / "d.jsonl"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p


def test_reads_rows_and_skips_blank_lines(tmp_path):
    ds = load_alpaca(write(tmp_path, row() + "\n\n" + row("Explain y") + "\n"))
    assert [r.line for r in ds.rows] == [1, 3]
    assert ds.warnings == []


@pytest.mark.parametrize(
    "content, expected",
    [
        ("", "is empty"),
        (row() + "\nnot json\n" + row() + "\n{bad\n", "line 2, 4 is not valid JSON"),
        ("[1, 2]\n", "array element 1, 2 is not a JSON object"),
        (row() + "\n[1, 2]\n", "line 2 is not a JSON object"),
        (json.dumps({"instruction": "x", "input": 0, "output": "y"}) + "\n", "line 1: 'input' is a number, not a string"),
        (json.dumps({"instruction": ["x"], "output": "y"}) + "\n", "'instruction' is a list, not a string"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n", "chat rows (OpenAI-style 'messages')"),
        (json.dumps({"conversations": [{"from": "human", "value": "hi"}]}) + "\n", "ShareGPT rows"),
        ('[{"instruction": "x", "output": "y"}, {"instruction": "z"}]', "line 2: missing or empty 'output'"),
        (json.dumps({"instruction": "x"}) + "\n", "line 1: missing or empty 'output'"),
        (json.dumps({"output": "x"}) + "\n", "missing or empty 'instruction'"),
        (row() + "\n" + json.dumps({"instruction": "", "output": "y"}) + "\n", "line 2"),
        (b'{"instruction": "caf\xe9", "output": "x"}\n', "d.jsonl:1: not UTF-8"),
    ],
)
def test_bad_datasets(tmp_path, content, expected):
    with pytest.raises(TutorWrapError) as exc:
        load_alpaca(write(tmp_path, content))
    assert expected in str(exc.value)


def test_missing_file(tmp_path):
    with pytest.raises(TutorWrapError, match="does not exist"):
        load_alpaca(tmp_path / "none.jsonl")


def test_duplicates_are_a_warning_not_an_error(tmp_path):
    ds = load_alpaca(write(tmp_path, "\n".join([row(), row("b"), row()]) + "\n"))
    assert len(ds.rows) == 3
    assert "line 3 duplicate" in ds.warnings[0]


def test_eval_prompts_may_omit_output(tmp_path):
    p = write(tmp_path, json.dumps({"instruction": "Explain x"}) + "\n")
    assert load_alpaca(p, require_output=False).rows[0].output == ""


def test_bom_and_json_array_files_are_read(tmp_path):
    """A UTF-8 BOM (Windows editors) and the original alpaca_data.json shape (one JSON array) are both datasets."""
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + (row() + "\n").encode())
    assert load_alpaca(bom).rows[0].instruction == "Explain x"
    arr = tmp_path / "alpaca_data.json"
    arr.write_text(json.dumps([json.loads(row()), json.loads(row("Explain y"))], indent=2))
    assert [r.instruction for r in load_alpaca(arr).rows] == ["Explain x", "Explain y"]
