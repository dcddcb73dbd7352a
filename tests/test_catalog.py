import json
import subprocess
import sys

import pytest

from tutor_wrap.models.catalog import CATALOG, from_config, known_ids, lookup
from tutor_wrap.core.errors import TutorWrapError

pytestmark = pytest.mark.tools

# Published parameter counts (model cards / safetensors metadata of the Hugging Face checkpoints).
KNOWN_TOTALS = {
    "llama-2-7b": 6_738_415_616,
    "llama-3-8b": 8_030_261_248,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "mistral-7b": 7_241_732_096,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-1.5b": 1_543_714_304,
    "qwen2.5-7b": 7_615_616_512,
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "smollm2-1.7b": 1_711_376_384,
}


@pytest.mark.parametrize("model_id,total", sorted(KNOWN_TOTALS.items()))
def test_parameter_totals(model_id, total):
    assert CATALOG[model_id].total_params == total


def test_catalog_has_exactly_the_listed_ids():
    assert set(known_ids()) == set(KNOWN_TOTALS)


def test_llama3_8b_parts():
    a = lookup("llama-3-8b")
    assert a.embedding_params == a.lm_head_params == 128256 * 4096
    per = a.linear_params_per_layer()
    assert per["q_proj"] == per["o_proj"] == 4096 * 4096
    assert per["k_proj"] == per["v_proj"] == 4096 * 1024
    assert per["gate_proj"] == per["up_proj"] == per["down_proj"] == 4096 * 14336
    assert a.decoder_linear_params == 32 * 218_103_808


def test_lora_param_counts():
    a = lookup("llama-3-8b")
    assert a.lora_params(32, "all-linear") == 83_886_080
    assert a.lora_params(32, ("q_proj", "v_proj")) == 32 * 32 * ((4096 + 4096) + (4096 + 1024))
    with pytest.raises(TutorWrapError, match="unknown LoRA target"):
        a.lora_params(8, ("q_proj", "qkv"))


def test_tied_and_biased():
    q = lookup("qwen2.5-0.5b")
    assert q.tie_word_embeddings and q.lm_head_params == 0 and q.qkv_bias
    assert q.bias_params_per_layer == 896 + 2 * 128
    assert not lookup("qwen2.5-7b").tie_word_embeddings
    assert lookup("smollm2-135m").tie_word_embeddings


@pytest.mark.parametrize("hub_id,cid", [
    ("meta-llama/Meta-Llama-3-8B", "llama-3-8b"),
    ("NousResearch/Meta-Llama-3-8B", "llama-3-8b"),
    ("meta-llama/Llama-2-7b-hf", "llama-2-7b"),
    ("NousResearch/Llama-2-7b-hf", "llama-2-7b"),
    ("meta-llama/Llama-3.1-8B", "llama-3.1-8b"),
    ("meta-llama/Llama-3.2-1B", "llama-3.2-1b"),
    ("mistralai/Mistral-7B-v0.1", "mistral-7b"),
    ("Qwen/Qwen2.5-7B", "qwen2.5-7b"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m"),
    ("huggingfacetb/smollm2-135m-instruct", "smollm2-135m"),
    ("LLAMA-3-8B", "llama-3-8b"),
])
def test_aliases_case_insensitive(hub_id, cid):
    assert lookup(hub_id).total_params == CATALOG[cid].total_params


def test_instruct_override_keeps_shapes():
    a = lookup("Qwen/Qwen2.5-7B-Instruct")
    assert a.max_position_embeddings == 32768
    assert a.total_params == CATALOG["qwen2.5-7b"].total_params


def test_unknown_id_names_known_ids():
    with pytest.raises(TutorWrapError) as e:
        lookup("acme/NotAModel-9B")
    text = str(e.value)
    assert "acme/NotAModel-9B" in text and "llama-3-8b" in text and "smollm2-135m" in text


def test_local_config(tmp_path):
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
           "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "vocab_size": 600, "tie_word_embeddings": False, "max_position_embeddings": 512,
           "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    a = lookup(str(tmp_path))
    assert a.head_dim == 64 and a.num_kv_heads == 2 and a.torch_dtype == "float32"
    per_layer = 256 * 256 * 2 + 256 * 128 * 2 + 3 * 256 * 512 + 2 * 256
    assert a.total_params == 2 * 600 * 256 + 2 * per_layer + 256


def test_local_qwen2_config_has_qkv_bias(tmp_path):
    cfg = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
           "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
           "max_position_embeddings": 32768}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert lookup(str(tmp_path)).total_params == KNOWN_TOTALS["qwen2.5-0.5b"]


def test_local_dir_without_config(tmp_path):
    with pytest.raises(TutorWrapError, match="no config.json"):
        lookup(str(tmp_path))


def test_config_missing_field():
    with pytest.raises(TutorWrapError, match="lacks a field"):
        from_config({"hidden_size": 8})


def test_no_heavy_imports():
    code = ("import tutor_wrap.planning.memory, tutor_wrap.models.catalog, sys; "
            "assert 'torch' not in sys.modules; assert 'transformers' not in sys.modules; "
            "assert 'axolotl' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
