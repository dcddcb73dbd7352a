"""Greedy continuations with transformers, fp32 on CPU (or the GPU when there is one): the reference a GGUF is
compared with. Run as `python -m tutor_wrap.backends.hf_generate IN.json OUT.json`; safetensors only, no remote code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tutor_wrap.core import atomic
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.proc import tool_env


def continuations(model_dir: Path, prompts: list[str], n: int, out: Path) -> list[str]:
    """Greedy continuations from the HF model, in a subprocess so this process never imports torch."""
    atomic.write_json(out.with_suffix(".in.json"), {"model": str(model_dir), "prompts": prompts, "n": n})
    proc = subprocess.run([sys.executable, "-m", "tutor_wrap.backends.hf_generate", str(out.with_suffix(".in.json")), str(out)],
                          capture_output=True, text=True, env=tool_env(), check=False)
    if proc.returncode != 0:
        raise TutorWrapError(f"greedy generation with transformers failed:\n{proc.stderr[-1500:]}")
    return json.loads(out.read_text("utf-8"))["texts"]


def main(argv: list[str]) -> int:
    spec = json.loads(open(argv[0], encoding="utf-8").read())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec["model"], trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], torch_dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=False)
    model.eval()
    texts = []
    with torch.no_grad():
        for prompt in spec["prompts"]:
            enc = tok(prompt, return_tensors="pt")
            out = model.generate(**enc, max_new_tokens=spec["n"], do_sample=False, num_beams=1,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
            texts.append(tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    with open(argv[1], "w", encoding="utf-8") as fh:
        json.dump({"texts": texts}, fh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
