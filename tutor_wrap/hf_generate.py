"""Greedy continuations with transformers, fp32 on CPU (or the GPU when there is one): the reference a GGUF is
compared with. Run as `python -m tutor_wrap.hf_generate IN.json OUT.json`; safetensors only, no remote code."""

from __future__ import annotations

import json
import sys


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
