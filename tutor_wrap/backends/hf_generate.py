"""Greedy continuations with transformers, fp32 on CPU (or the GPU when there is one): the reference a GGUF is
compared with. Run as `python -m tutor_wrap.backends.hf_generate IN.json OUT.json`; safetensors only, no remote code.

`greedy_texts` is also called by the merge verification, which has the merged model loaded already: the export
then takes its continuations (`Request.matches`) instead of importing torch and loading the model once more.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from tutor_wrap.core import atomic
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.hashing import fingerprint
from tutor_wrap.core.proc import die_with_parent, tail, tool_env


@dataclass(frozen=True)
class Request:
    """Greedy continuations of `prompts`, `n` tokens each."""
    prompts: list[str]
    n: int

    @property
    def key(self) -> str:
        return fingerprint(self.prompts, self.n)

    def matches(self, recorded: dict | None) -> list[str] | None:
        """The texts of an earlier answer to this same request (prompts and length), else None."""
        if recorded and recorded.get("key") == self.key and len(recorded.get("texts") or []) == len(self.prompts):
            return list(recorded["texts"])
        return None


def greedy_texts(model, tokenizer, req: Request) -> dict:
    """`req` answered by a loaded transformers model: {"key", "texts"} (what `Request.matches` reads back)."""
    import torch

    texts = []
    with torch.no_grad():
        for prompt in req.prompts:
            enc = tokenizer(prompt, return_tensors="pt").to(model.device)
            out = model.generate(**enc, max_new_tokens=req.n, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            texts.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return {"key": req.key, "texts": texts}


def start(model_dir: Path, req: Request, out: Path) -> subprocess.Popen:
    """Start the subprocess (this process never imports torch); `finish` waits for it. Starting it before the
    GGUF conversion lets the two share the machine: the converter keeps about one core busy."""
    atomic.write_json(out.with_suffix(".in.json"), {"model": str(model_dir), **asdict(req)})
    out.unlink(missing_ok=True)
    # stderr to a file: a pipe nobody reads while the conversion runs could fill and stall the child.
    with open(out.with_suffix(".log"), "w") as log:
        return subprocess.Popen([sys.executable, "-m", "tutor_wrap.backends.hf_generate",
                                 str(out.with_suffix(".in.json")), str(out)], stdout=subprocess.DEVNULL, stderr=log,
                                env=tool_env(), preexec_fn=die_with_parent)


def finish(proc: subprocess.Popen, out: Path) -> list[str]:
    if proc.wait() != 0 or not out.is_file():
        raise TutorWrapError(f"greedy generation with transformers failed (exit {proc.returncode}); log: "
                             f"{out.with_suffix('.log')}\n{tail(out.with_suffix('.log'), 15)}")
    return json.loads(out.read_text("utf-8"))["texts"]


def continuations(model_dir: Path, req: Request, out: Path) -> list[str]:
    return finish(start(model_dir, req, out), out)


def main(argv: list[str]) -> int:
    spec = json.loads(open(argv[0], encoding="utf-8").read())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(spec["model"], trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=False).eval()
    result = greedy_texts(model, tok, Request(spec["prompts"], spec["n"]))
    atomic.write_json(Path(argv[1]), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
