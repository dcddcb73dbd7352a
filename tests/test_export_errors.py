"""Export errors a person can act on, from the real converter."""

import json
import shutil

import pytest

from tutor_wrap.backends import llamacpp
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.backends.gguf_export import check_convertible, convert_model


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
