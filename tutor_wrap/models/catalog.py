"""Model shapes for the memory model: a small built-in catalog and a reader for a local config.json.

Stdlib only (no torch/transformers): the planner and `estimate` must answer in well under a second.

Every built-in entry is the model's public `config.json` on the Hugging Face Hub (values checked against copies
quoted in public repositories). Details that matter for memory:

- Qwen2.5 has biases on q/k/v (not o, not the MLP) and ties lm_head to the embeddings for 0.5B and 1.5B
  (not for 7B, whose vocab is also padded to 152064 instead of 151936).
- Llama-3.2 1B/3B and all SmolLM2 sizes tie lm_head to the embeddings.
- Llama-3.2-1B sets head_dim 64 explicitly (2048/32 = 64 anyway); Llama-3.2-3B 128 (3072/24 = 128).
- The -Instruct variants have the same shapes; only Qwen2.5-1.5B/7B-Instruct have a shorter
  max_position_embeddings (32768 instead of 131072), kept as a per-alias override.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from tutor_wrap.core.errors import TutorWrapError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Architecture:
    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    torch_dtype: str = "bfloat16"
    model_type: str = "llama"
    qkv_bias: bool = False          # Qwen2: biases on q/k/v projections

    # ---- shapes of the seven decoder projections: (in_features, out_features)
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        h, i = self.hidden_size, self.intermediate_size
        q_out = self.num_heads * self.head_dim
        kv_out = self.num_kv_heads * self.head_dim
        return {
            "q_proj": (h, q_out),
            "k_proj": (h, kv_out),
            "v_proj": (h, kv_out),
            "o_proj": (q_out, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def linear_params_per_layer(self) -> dict[str, int]:
        """Weight elements of each projection in one decoder layer (biases excluded)."""
        return {name: fi * fo for name, (fi, fo) in self.linear_shapes().items()}

    @property
    def bias_params_per_layer(self) -> int:
        if not self.qkv_bias:
            return 0
        s = self.linear_shapes()
        return s["q_proj"][1] + s["k_proj"][1] + s["v_proj"][1]

    @property
    def norm_params_per_layer(self) -> int:
        return 2 * self.hidden_size     # input_layernorm + post_attention_layernorm (RMSNorm weights)

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        # A tied head shares the embedding matrix: no extra parameters (and no extra memory).
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def decoder_linear_params(self) -> int:
        """What bitsandbytes quantizes for qlora/lora8bit: the seven projections of every layer."""
        return self.num_layers * sum(self.linear_params_per_layer().values())

    @property
    def total_params(self) -> int:
        per_layer = sum(self.linear_params_per_layer().values()) + self.bias_params_per_layer + self.norm_params_per_layer
        return self.embedding_params + self.lm_head_params + self.num_layers * per_layer + self.hidden_size  # + final norm

    @property
    def non_quantized_params(self) -> int:
        """Embeddings, head, norms and biases: left in 16-bit when the decoder linears are quantized."""
        return self.total_params - self.decoder_linear_params

    def lora_params(self, r: int, targets: str | tuple[str, ...] = "all-linear") -> int:
        """LoRA A (r x in) + B (out x r) for each targeted projection of every layer."""
        shapes = self.linear_shapes()
        names = resolve_targets(targets)
        return self.num_layers * sum(r * (shapes[n][0] + shapes[n][1]) for n in names)


def resolve_targets(targets: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    if isinstance(targets, str):
        if targets in ("all-linear", "all_linear", "linear"):
            return PROJECTIONS
        targets = (targets,)
    unknown = [t for t in targets if t not in PROJECTIONS]
    if unknown:
        raise TutorWrapError(
            f"unknown LoRA target module(s): {', '.join(unknown)}",
            hint=f"use 'all-linear' or a list of: {', '.join(PROJECTIONS)}",
        )
    if not targets:
        raise TutorWrapError("LoRA targets list is empty", hint="use 'all-linear' or e.g. [q_proj, v_proj]")
    return tuple(dict.fromkeys(targets))


def _arch(name, h, i, layers, heads, kv, vocab, tie, max_pos, dtype="bfloat16", model_type="llama",
          head_dim=None, qkv_bias=False) -> Architecture:
    return Architecture(name=name, hidden_size=h, intermediate_size=i, num_layers=layers, num_heads=heads,
                        num_kv_heads=kv, head_dim=head_dim or h // heads, vocab_size=vocab,
                        tie_word_embeddings=tie, max_position_embeddings=max_pos, torch_dtype=dtype,
                        model_type=model_type, qkv_bias=qkv_bias)


# id -> Architecture: the public config.json values of the base checkpoint.
CATALOG: dict[str, Architecture] = {
    a.name: a
    for a in (
        _arch("llama-2-7b", 4096, 11008, 32, 32, 32, 32000, False, 4096, dtype="float16"),
        _arch("llama-3-8b", 4096, 14336, 32, 32, 8, 128256, False, 8192),
        _arch("llama-3.1-8b", 4096, 14336, 32, 32, 8, 128256, False, 131072),
        _arch("llama-3.2-1b", 2048, 8192, 16, 32, 8, 128256, True, 131072, head_dim=64),
        _arch("llama-3.2-3b", 3072, 8192, 28, 24, 8, 128256, True, 131072, head_dim=128),
        _arch("mistral-7b", 4096, 14336, 32, 32, 8, 32000, False, 32768, model_type="mistral"),
        _arch("qwen2.5-0.5b", 896, 4864, 24, 14, 2, 151936, True, 32768, model_type="qwen2", qkv_bias=True),
        _arch("qwen2.5-1.5b", 1536, 8960, 28, 12, 2, 151936, True, 131072, model_type="qwen2", qkv_bias=True),
        _arch("qwen2.5-7b", 3584, 18944, 28, 28, 4, 152064, False, 131072, model_type="qwen2", qkv_bias=True),
        _arch("smollm2-135m", 576, 1536, 30, 9, 3, 49152, True, 8192),
        _arch("smollm2-360m", 960, 2560, 32, 15, 5, 49152, True, 8192),
        _arch("smollm2-1.7b", 2048, 8192, 24, 32, 32, 49152, True, 8192),
    )
}

# hub id (lower-case) -> (catalog id, field overrides). Instruct variants share the base shapes.
_ALIASES: dict[str, tuple[str, dict]] = {}


def _alias(catalog_id: str, *hub_ids: str, **overrides) -> None:
    for hub_id in hub_ids:
        _ALIASES[hub_id.lower()] = (catalog_id, overrides)


_alias("llama-2-7b", "meta-llama/Llama-2-7b-hf", "NousResearch/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf",
       "NousResearch/Llama-2-7b-chat-hf")
_alias("llama-3-8b", "meta-llama/Meta-Llama-3-8B", "NousResearch/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct",
       "NousResearch/Meta-Llama-3-8B-Instruct")
_alias("llama-3.1-8b", "meta-llama/Llama-3.1-8B", "meta-llama/Meta-Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct",
       "meta-llama/Meta-Llama-3.1-8B-Instruct", "NousResearch/Meta-Llama-3.1-8B", "NousResearch/Meta-Llama-3.1-8B-Instruct",
       "unsloth/Meta-Llama-3.1-8B", "unsloth/Meta-Llama-3.1-8B-Instruct")
_alias("llama-3.2-1b", "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct", "unsloth/Llama-3.2-1B",
       "unsloth/Llama-3.2-1B-Instruct")
_alias("llama-3.2-3b", "meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.2-3B-Instruct", "unsloth/Llama-3.2-3B",
       "unsloth/Llama-3.2-3B-Instruct")
_alias("mistral-7b", "mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.1")
_alias("qwen2.5-0.5b", "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B-Instruct")
_alias("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B")
_alias("qwen2.5-1.5b", "Qwen/Qwen2.5-1.5B-Instruct", max_position_embeddings=32768)
_alias("qwen2.5-7b", "Qwen/Qwen2.5-7B")
_alias("qwen2.5-7b", "Qwen/Qwen2.5-7B-Instruct", max_position_embeddings=32768)
_alias("smollm2-135m", "HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M-Instruct")
_alias("smollm2-360m", "HuggingFaceTB/SmolLM2-360M", "HuggingFaceTB/SmolLM2-360M-Instruct")
_alias("smollm2-1.7b", "HuggingFaceTB/SmolLM2-1.7B", "HuggingFaceTB/SmolLM2-1.7B-Instruct")


def known_ids() -> list[str]:
    return sorted(CATALOG)


def from_config(config: dict, name: str = "local") -> Architecture:
    """Architecture from a LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM style config.json dict."""
    cfg = config.get("text_config") or config     # multimodal wrappers keep the LM under text_config
    try:
        h = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        arch = Architecture(
            name=name,
            hidden_size=h,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or h // heads),
            vocab_size=int(cfg["vocab_size"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 0),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or config.get("torch_dtype") or "bfloat16"),
            model_type=str(cfg.get("model_type") or "llama"),
            # Qwen2 configs have no flag: the architecture itself has q/k/v biases. Llama has `attention_bias`.
            qkv_bias=bool(cfg.get("attention_bias", False)) or str(cfg.get("model_type")) == "qwen2",
        )
    except (KeyError, TypeError, ValueError) as e:
        raise TutorWrapError(
            f"{name}: config.json lacks a field the memory model needs ({e})",
            hint="a Llama/Mistral/Qwen2-style config.json needs hidden_size, intermediate_size, num_hidden_layers, "
                 "num_attention_heads, vocab_size",
        ) from None
    return arch


def lookup(model: str) -> Architecture:
    """A local directory with config.json, else a catalog id or known hub id (case-insensitive)."""
    p = Path(model).expanduser()
    if p.is_dir():
        cfg_path = p / "config.json"
        if not cfg_path.is_file():
            raise TutorWrapError(f"{model}: no config.json in this directory",
                                 hint="point base_model at a Hugging Face model folder (config.json + safetensors)")
        try:
            config = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise TutorWrapError(f"{cfg_path}: cannot read it as JSON ({e})") from None
        return from_config(config, name=p.name)
    key = model.strip().lower()
    if key in CATALOG:
        return CATALOG[key]
    if key in _ALIASES:
        cid, overrides = _ALIASES[key]
        arch = CATALOG[cid]
        return dataclasses.replace(arch, **overrides) if overrides else arch
    raise TutorWrapError(
        f"unknown model '{model}': not a local folder with config.json and not in the built-in catalog",
        hint=f"use a local model folder or one of: {', '.join(known_ids())} (or their Hugging Face ids)",
    )
