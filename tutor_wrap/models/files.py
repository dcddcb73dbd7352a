"""What a Hugging Face model folder holds, read without torch: config.json, safetensors weights and their headers."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from tutor_wrap.core.errors import TutorWrapError


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(Path(model_dir).glob("*.safetensors"))


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file: {name: {dtype, shape, data_offsets}}, without torch."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return header


def param_stats(model_dir: Path) -> dict:
    """Parameter count, bytes by dtype and the dominant floating dtype of a safetensors model folder."""
    params, by_dtype = 0, {}
    for f in weight_files(model_dir):
        for t in read_header(f).values():
            n = math.prod(t["shape"])
            params += n
            by_dtype[t["dtype"]] = by_dtype.get(t["dtype"], 0) + n
    floats = {k: v for k, v in by_dtype.items() if k in ("F32", "BF16", "F16")}
    return {"params": params, "params_by_dtype": by_dtype,
            "dtype": max(floats, key=floats.get) if floats else None}


def read_config(model_dir: Path) -> dict:
    """config.json as a dict; {} when it is missing or unreadable (callers that need it check first)."""
    try:
        return json.loads((Path(model_dir) / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return {}


def source_bytes_per_param(cfg: dict) -> int:
    """Bytes per weight as stored: fp32 checkpoints are twice the size of the f16 GGUF made from them."""
    return 4 if str(cfg.get("torch_dtype") or cfg.get("dtype")) == "float32" else 2


def check_base_model(path: Path, *, allow_pickle: bool) -> dict:
    """A local base model must be a real HF model folder with safetensors weights (pickle only if opted in)."""
    cfg = path / "config.json"
    if not cfg.is_file():
        raise TutorWrapError(f"base model {path} has no config.json: it is not a Hugging Face model folder",
                             hint="point base_model at the folder that holds config.json and *.safetensors")
    try:
        config = json.loads(cfg.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TutorWrapError(f"{cfg}: unreadable ({exc})", hint="re-download or re-save the model") from None
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            if not allow_pickle:
                raise TutorWrapError(
                    f"base model {path} has only pickled weights (*.bin/*.pt), which can run code when loaded",
                    hint="convert it to safetensors, or set `allow_pickle_weights: true` in the recipe if you trust it",
                )
        else:
            raise TutorWrapError(f"base model {path} has no weights (*.safetensors)", hint="copy the model's weight files into that folder")
    return config
