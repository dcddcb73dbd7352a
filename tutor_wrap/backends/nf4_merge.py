"""Merge a QLoRA adapter into the model QLoRA trained: the NF4-quantized base, not the full-precision one.

    python -m tutor_wrap.backends.nf4_merge BASE ADAPTER OUT --compute-dtype {float32,bfloat16,float16}

QLoRA trains the adapter on top of the base as bitsandbytes loaded it: every linear layer of the decoder stored
in NF4 and dequantized on the fly, while embeddings, norms and the output head stay in 16/32 bit. The model that
was trained is therefore dequant(quant(W)) + scale * B @ A for each quantized layer, and W for everything else.
Merging into the full-precision W instead (what a plain LoRA merge does) gives a model that was never trained;
Axolotl's memory-efficient merge goes the other way and round-trips every 2-D tensor through NF4, embeddings and
head included (issue 22 measured 35% next-token agreement with the trained model for it).

So the base is loaded exactly as Axolotl 0.19 loads it for `adapter: qlora` (transformers' BitsAndBytesConfig:
NF4, double quantization, bf16 quant storage, compute dtype = the training dtype; axolotl/loaders/model.py), each
quantized layer's weight is dequantized by bitsandbytes itself, the LoRA delta is added in fp32, and the result is
written in the base's dtype, shard by shard in the base's own layout, next to the base's unquantized tensors as
stored. Peak RAM: the 4-bit model (about 0.56 bytes per parameter plus the 16-bit embeddings) and one shard.
Prints one JSON line (what was merged); exit 0 on success.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

# Copied from the base as they are (as merge-lora does); the merge stage then puts training's tokenizer over them.
_COPY = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "tokenizer.model", "chat_template.jinja")
# Axolotl 0.19's QLoRA load (axolotl/loaders/model.py): what bitsandbytes did to the base during training.
QUANT = {"quant_type": "nf4", "double_quant": True, "quant_storage": "bfloat16"}


def quantization_config(compute_dtype: str):
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
                              bnb_4bit_use_double_quant=QUANT["double_quant"], bnb_4bit_quant_type=QUANT["quant_type"],
                              bnb_4bit_quant_storage=getattr(torch, QUANT["quant_storage"]))


def load_nf4(base: Path, compute_dtype: str):
    """The base as QLoRA training loaded it (CPU, offline, safetensors only)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(base), quantization_config=quantization_config(compute_dtype), dtype=getattr(torch, compute_dtype),
        device_map="cpu", use_safetensors=True, trust_remote_code=False, local_files_only=True).eval()


def dequantized(layer, compute_dtype: str):
    """A 4-bit layer's weight as training multiplied with it, in fp32: bitsandbytes' own dequantization, rounded to
    the compute dtype (MatMul4Bit casts the dequantized weight to the activations' dtype before the matmul)."""
    import bitsandbytes as bnb
    import torch

    w = layer.weight
    return bnb.functional.dequantize_4bit(w.data, w.quant_state).to(getattr(torch, compute_dtype)).to(torch.float32)


def _lora(adapter: Path):
    from tutor_wrap.models.files import adapter_config, lora_pairs

    acfg = adapter_config(adapter)
    r, alpha = int(acfg["r"]), float(acfg["lora_alpha"])
    return lora_pairs(adapter), (alpha / math.sqrt(r) if acfg.get("use_rslora") else alpha / r)


def merge(base: Path, adapter: Path, out: Path, compute_dtype: str) -> dict:
    import bitsandbytes as bnb
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tutor_wrap.models.files import weight_files

    t0 = time.perf_counter()
    model = load_nf4(base, compute_dtype)
    quantized = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    pairs, scale = _lora(adapter)
    unmatched = sorted(k for k in pairs if k not in quantized)
    if unmatched:
        # An adapter on a layer QLoRA did not quantize (the head, say) is a plain LoRA merge there: not handled.
        raise SystemExit(f"adapter modules outside the NF4 layers: {', '.join(unmatched[:5])}")
    out.mkdir(parents=True, exist_ok=True)
    n_quant = n_adapted = 0
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt", device="cpu") as ad:
        for shard in weight_files(base):
            tensors = {}
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                for key in f.keys():
                    stored = f.get_tensor(key)
                    if key in quantized:
                        deq = dequantized(quantized[key], compute_dtype)
                        n_quant += 1
                        if key in pairs:
                            a_k, b_k = pairs[key]
                            deq = deq + scale * (ad.get_tensor(b_k).to(torch.float32) @ ad.get_tensor(a_k).to(torch.float32))
                            n_adapted += 1
                        tensors[key] = deq.to(stored.dtype).contiguous()
                    else:
                        tensors[key] = stored
            save_file(tensors, str(out / shard.name), metadata={"format": "pt"})
            del tensors
    index = base / "model.safetensors.index.json"
    if index.is_file():
        shutil.copy2(index, out / index.name)
    for name in _COPY:
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)
    cfg = json.loads((out / "config.json").read_text("utf-8"))
    cfg.pop("quantization_config", None)   # the merged model is plain: llama.cpp's converter refuses bitsandbytes
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return {"method": "nf4", "quantized_tensors": n_quant, "adapted_tensors": n_adapted, "scale": scale,
            "compute_dtype": compute_dtype, **QUANT, "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tutor_wrap.backends.nf4_merge", description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("adapter", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(merge(args.base, args.adapter, args.out, args.compute_dtype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
