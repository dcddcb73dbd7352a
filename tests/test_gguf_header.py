"""The GGUF header reader against gguf-py's own writer and reader, on files gguf-py writes in both byte orders."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFEndian, GGUFReader, GGUFWriter

from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.models.gguf_file import ArrayInfo, read_gguf_header

pytestmark = pytest.mark.unit


def write_gguf(path, endian):
    w = GGUFWriter(str(path), "llama", endianess=endian)
    w.add_context_length(2048)
    w.add_file_type(15)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" * (i % 5 + 1) for i in range(300)] + ["ünïcode"])
    w.add_token_scores([float(i) / 7 for i in range(301)])
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_float32("test.f32", 0.25)
    w.add_int64("test.i64", -(1 << 40))
    w.add_float64("test.f64", 1e-300)
    w.add_int8("test.i8", -3)
    w.add_chat_template("{{ messages[0]['content'] }}")
    w.add_tensor("a.weight", np.ones((4, 32), dtype=np.float32))
    w.add_tensor("b.weight", np.ones((2, 32), dtype=np.float16))
    w.add_tensor("c.weight", np.ones((8,), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("endian", [GGUFEndian.LITTLE, GGUFEndian.BIG])
def test_header_matches_gguf_py(tmp_path, endian):
    path = tmp_path / "m.gguf"
    write_gguf(path, endian)
    ref = GGUFReader(str(path))
    head = read_gguf_header(path)
    assert head.tensor_count == len(ref.tensors) == 3
    types: dict[str, int] = {}
    for t in ref.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    assert head.tensor_types == types == {"F32": 2, "F16": 1}
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert sorted(head.fields) == sorted(keys)
    for k in keys:
        got, want = head.fields[k], ref.fields[k].contents()
        if isinstance(got, ArrayInfo):
            assert got.length == len(want), k
        elif isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-7), k
        else:
            assert got == want, k
    assert head.fields["tokenizer.ggml.tokens"] == ArrayInfo("STRING", 301)
    assert head.fields["tokenizer.chat_template"] == "{{ messages[0]['content'] }}"


def test_truncated_and_foreign_files_are_named(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(path, GGUFEndian.LITTLE)
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:2000])    # inside the token list
    with pytest.raises(TutorWrapError, match="cut.gguf: unreadable GGUF header"):
        read_gguf_header(cut)
    other = tmp_path / "model.safetensors"
    other.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(TutorWrapError, match="model.safetensors is not a GGUF file"):
        read_gguf_header(other)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(TutorWrapError, match="empty.gguf is empty"):
        read_gguf_header(empty)
