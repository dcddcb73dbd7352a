"""Export errors a person can act on, from the real converter."""

import json
import shutil

import pytest

from tutor_wrap.backends import llamacpp
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.backends.gguf_export import check_convertible, convert_model

pytestmark = pytest.mark.tools


def test_an_architecture_the_converter_does_not_know_is_named(tiny_model, tmp_path):
    model = tmp_path / "foo"
    shutil.copytree(tiny_model, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(architectures=["FooBarForCausalLM"], model_type="foobar")
    (model / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "foo.gguf"
    with pytest.raises(TutorWrapError) as exc:
        convert_model(llamacpp.locate(), model, out, "f16", tmp_path / "export.log")
    assert "does not support the architecture FooBarForCausalLM" in str(exc.value)
    assert not out.exists() and not list(tmp_path.glob(".foo.gguf*"))


def test_a_merged_config_that_still_carries_quantization_is_refused(tiny_model, tmp_path):
    model = tmp_path / "q"
    shutil.copytree(tiny_model, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (model / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TutorWrapError, match="quantization_config"):
        check_convertible(model)


def test_missing_llama_cpp_says_how_to_build_it(tmp_path, monkeypatch):
    # A real empty cache directory, as on a machine where the build never ran.
    monkeypatch.setenv("TUTOR_WRAP_CACHE", str(tmp_path))
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    with pytest.raises(TutorWrapError) as exc:
        llamacpp.locate()
    assert "build_llamacpp.py" in str(exc.value)


def test_fallback_tensors_are_counted_once_each(tmp_path):
    """A model whose rows are not multiples of 256 (hidden 320): llama-quantize gives those tensors a fallback type.
    The count equals the number of 2-D weights with such rows, read independently from the safetensors headers
    (the output head aside: llama.cpp picks its type itself, Q8_0 here, without a fallback)."""
    from tiny_model import build_tiny_llama

    from tutor_wrap.backends.gguf_export import export_model
    from tutor_wrap.models.files import read_header, weight_files

    model = build_tiny_llama(tmp_path / "odd", hidden_size=320, intermediate_size=640)
    expected = sum(1 for f in weight_files(model) for name, t in read_header(f).items()
                   if len(t["shape"]) == 2 and t["shape"][1] % 256 and name != "lm_head.weight")
    out = tmp_path / "out"
    out.mkdir()
    report = export_model(model, out, "odd", ["Q4_K_M"], "cpu", tmp_path / "export.log")
    q = report.files["Q4_K_M"]
    assert expected > 0 and q.fallback_tensors == expected
    # each of them is in the file as a 32-block type, and the head is the one more Q8_0
    assert sum(n for kind, n in q.metadata["tensor_types"].items() if kind in ("Q5_0", "Q5_1", "Q8_0", "Q4_0")) == expected + 1
