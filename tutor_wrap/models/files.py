"""What a Hugging Face model folder holds, read without torch: config.json, safetensors weights and their headers."""

from __future__ import annotations

import functools
import json
import math
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from tutor_wrap.core import atomic
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
    for f in sorted(path.glob("*.safetensors")):
        problem = _safetensors_problem(f)
        if problem:
            raise TutorWrapError(f"{f}: {problem}", hint="the download or copy did not finish: fetch that file again")
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    if archs and not any(a.endswith(_GENERATIVE) for a in archs):
        raise TutorWrapError(f"{cfg}: architecture {', '.join(archs)} is not a text-generating model (no "
                             "language-model head): it cannot be fine-tuned to answer",
                             hint="pick a causal language model (its architecture ends in ForCausalLM)")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise TutorWrapError(f"base model {path} has no tokenizer ({' or '.join(_TOKENIZER_FILES)})",
                             hint="copy the model's tokenizer files into that folder (they come with the weights)")
    return config


_GENERATIVE = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be whole (None: its header reads and its size covers every tensor)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or 8 + n > size:
                return f"truncated: {size} bytes, less than its own header says"
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as exc:
        return f"not a safetensors file ({exc.__class__.__name__})"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
               and "data_offsets" in t), default=0)
    if 8 + n + end > size:
        return f"truncated: {size} bytes where its tensors need {8 + n + end}"
    return None


def write_chat_template(model_dir: Path, template: str) -> None:
    """Make `template` the model's chat template wherever a consumer looks: tokenizer_config.json (what llama.cpp's
    converter and Ollama's safetensors import read first) and chat_template.jinja (what transformers 5 writes and
    reads); a chat_template.json or additional templates, which could be read instead, are removed."""
    model_dir = Path(model_dir)
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text("utf-8")) if cfg_path.is_file() else {}
    cfg["chat_template"] = template
    atomic.write_json(cfg_path, cfg)
    atomic.write_text(model_dir / "chat_template.jinja", template)
    (model_dir / "chat_template.json").unlink(missing_ok=True)
    extra = model_dir / "additional_chat_templates"
    if extra.is_dir():
        shutil.rmtree(extra)


@dataclass(frozen=True)
class TokenizerInfo:
    chat_template: str | None       # the model's own Jinja (tokenizer_config.json, else chat_template.jinja)
    bos_token: str
    eos_token: str
    tokens: frozenset[str]          # every single-token string: vocabulary and added tokens


def _token_text(v) -> str:
    return v.get("content", "") if isinstance(v, dict) else (v or "")


def read_tokenizer_info(model_dir: Path) -> TokenizerInfo | None:
    """What planning needs of a model's tokenizer, read from its files (no transformers import); None without
    tokenizer_config.json. Every stage asks for the dataset format, so a run would parse the same tokenizer.json
    (megabytes) about ten times: the result is kept per folder while its files are unchanged."""
    model_dir = Path(model_dir).resolve()
    stamps = tuple((n, (model_dir / n).stat().st_mtime_ns if (model_dir / n).is_file() else None)
                   for n in ("tokenizer_config.json", "tokenizer.json", "chat_template.jinja"))
    return _read_tokenizer_info(model_dir, stamps)


@functools.lru_cache(maxsize=8)
def _read_tokenizer_info(model_dir: Path, stamps: tuple) -> TokenizerInfo | None:
    cfg_path = model_dir / "tokenizer_config.json"
    if not cfg_path.is_file():
        return None
    cfg = json.loads(cfg_path.read_text("utf-8"))
    template = cfg.get("chat_template")
    if isinstance(template, list):      # named templates: the default one is what apply_chat_template uses
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    jinja = model_dir / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text("utf-8")
    tokens: set[str] = set()
    tok_path = model_dir / "tokenizer.json"
    if tok_path.is_file():
        tok = json.loads(tok_path.read_text("utf-8"))
        tokens |= {t.get("content", "") for t in tok.get("added_tokens") or []}
        vocab = (tok.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            tokens |= set(vocab)
    tokens |= {_token_text(v) for v in (cfg.get("added_tokens_decoder") or {}).values()}
    return TokenizerInfo(template if isinstance(template, str) else None, _token_text(cfg.get("bos_token")),
                         _token_text(cfg.get("eos_token")), frozenset(tokens))


def linear_module_names(model_dir: Path) -> set[str]:
    """Names of the 2-D weight modules inside the decoder layers ("q_proj", "down_proj", ...): what LoRA can target."""
    names = set()
    for f in weight_files(model_dir):
        for key, t in read_header(f).items():
            parts = key.split(".")
            if len(t["shape"]) == 2 and parts[-1] == "weight" and "layers" in parts:
                names.add(parts[-2])
    return names


# ---- a PEFT LoRA adapter folder


def adapter_config(adapter: Path) -> dict:
    return json.loads((adapter / "adapter_config.json").read_text("utf-8"))


def check_adapter(adapter: Path) -> dict:
    """A LoRA adapter folder as PEFT saves it (adapter_config.json with r and lora_alpha, weights in
    adapter_model.safetensors), or one error naming what is missing; its config when it is one."""
    adapter = Path(adapter)
    hint = "point --adapter at the folder training wrote (runs/<name>/train/out) or a PEFT LoRA save_pretrained folder"
    if not adapter.is_dir():
        raise TutorWrapError(f"{adapter}: not a directory", hint=hint)
    try:
        cfg = adapter_config(adapter)
    except FileNotFoundError:
        raise TutorWrapError(f"{adapter}: no adapter_config.json: not a PEFT adapter folder", hint=hint) from None
    except (OSError, ValueError) as exc:
        raise TutorWrapError(f"{adapter / 'adapter_config.json'}: not readable JSON ({exc})", hint=hint) from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise TutorWrapError(f"{adapter / 'adapter_config.json'}: peft_type "
                             f"{cfg.get('peft_type') if isinstance(cfg, dict) else cfg!r} is not LORA", hint=hint)
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1 or not isinstance(alpha, (int, float)):
        raise TutorWrapError(f"{adapter / 'adapter_config.json'}: r {r!r} and lora_alpha {alpha!r}: a LoRA needs a "
                             "positive integer r and a number lora_alpha", hint=hint)
    if not (adapter / "adapter_model.safetensors").is_file():
        found = ", ".join(sorted(p.name for p in adapter.iterdir() if p.name.startswith("adapter_model"))) or "none"
        raise TutorWrapError(f"{adapter}: no adapter_model.safetensors (found: {found}); only safetensors adapters "
                             "are read (no pickle)", hint=hint)
    return cfg


def lora_pairs(adapter: Path) -> dict[str, tuple[str, str]]:
    """base weight key -> (lora_A key, lora_B key) in adapter_model.safetensors (PEFT's naming)."""
    pairs: dict[str, dict] = {}
    for k in read_header(adapter / "adapter_model.safetensors"):
        for side in ("lora_A", "lora_B"):
            tag = f".{side}.weight"
            if k.endswith(tag):
                mod = k[: -len(tag)]
                if mod.startswith("base_model.model."):
                    mod = mod[len("base_model.model."):]
                pairs.setdefault(mod + ".weight", {})[side] = k
    return {w: (d["lora_A"], d["lora_B"]) for w, d in pairs.items() if len(d) == 2}


def adapter_mismatch(base: Path, adapter: Path) -> str | None:
    """Why the adapter cannot belong to this base (None: every LoRA pair meets a base weight of its shape), read
    from the safetensors headers: a merge into the wrong base would otherwise fail inside the tool, or worse."""
    shapes: dict[str, list[int]] = {}
    for f in weight_files(base):
        if f.suffix == ".safetensors":
            shapes.update({k: t["shape"] for k, t in read_header(f).items() if isinstance(t, dict) and "shape" in t})
    if not shapes:
        return None                      # pickled weights (opted in): nothing to read without loading them
    header = read_header(adapter / "adapter_model.safetensors")
    for weight, (a_key, b_key) in lora_pairs(adapter).items():
        have = shapes.get(weight)
        if have is None:
            return f"the adapter changes {weight}, which the base model does not have"
        a, b = header[a_key]["shape"], header[b_key]["shape"]
        want = [b[0], a[1]]
        if list(have) != want:
            return f"the adapter's {weight} is {want[0]}x{want[1]}, the base model's is {have[0]}x{have[1]}"
    return None
