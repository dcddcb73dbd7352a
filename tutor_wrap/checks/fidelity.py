"""Does a GGUF behave like the model it came from? Greedy agreement and perplexity on held-out references.

Agreement is counted in tokens of the model's own tokenizer (tokenizer.json through `tokenizers`, no torch):
two greedy continuations agree on the first N tokens, or on how many leading tokens when they part.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from tutor_wrap.backends import hf_generate, llamacpp
from tutor_wrap.backends.gguf_export import ExportReport
from tutor_wrap.backends.llama_server import serve
from tutor_wrap.core import atomic
from tutor_wrap.core.units import duration


def reference_text(prompts_and_answers: list[tuple[str, str]], path: Path) -> Path | None:
    """The held-out prompts with their reference answers, in the training format, one after another."""
    rows = [p + a for p, a in prompts_and_answers if a]
    if not rows:
        return None
    atomic.write_text(path, "\n\n".join(rows) + "\n")
    return path


def _ids(tokenizer_json: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def matching_prefix(a: list[int], b: list[int], n: int) -> int:
    k = 0
    for x, y in zip(a[:n], b[:n]):
        if x != y:
            break
        k += 1
    return k


def agreement(texts_a: list[str], texts_b: list[str], tokenizer_json: Path, n: int) -> dict:
    """Per prompt: do the two continuations agree on their first n tokens (or stop at the same place before)?"""
    ids = _ids(tokenizer_json)
    pairs = [(ids(a)[:n], ids(b)[:n]) for a, b in zip(texts_a, texts_b)]
    prefixes = [matching_prefix(a, b, n) for a, b in pairs]
    return {"prompts": len(pairs), "tokens": n, "agree": sum(a == b for a, b in pairs),
            "mean_matching_prefix": sum(prefixes) / max(1, len(prefixes)), "per_prompt": prefixes}


def gguf_continuations(ll: llamacpp.LlamaCpp, gguf: Path, prompts: list[str], n: int, tokenizer_json: Path,
                       speed: list | None = None) -> list[str]:
    """Greedy continuations of raw prompts from one llama-server (one model load for all of them; the prompt cache
    off, so each is what a fresh process would give). The context fits the longest prompt plus `n`. `speed`: a
    list to append the server's measured (generation, prompt) tokens per second to."""
    ids = _ids(tokenizer_json)
    ctx = max(len(ids(p)) for p in prompts) + n + 16      # + BOS and tokenizer differences
    with serve(ll, gguf, ctx=ctx, log=gguf.with_suffix(".fidelity-server.log")) as server:
        if speed is not None:
            speed.append(server.speed(ctx))
        return [server.complete(p, n_predict=n)[0] for p in prompts]


def checks_seconds(speed: tuple[float, float], *, generated: int, scored: int) -> float | None:
    """The export checks' time at most, from the unquantized GGUF's measured speed (the quantized ones are
    faster): the tokens they generate and the tokens llama-perplexity scores."""
    gen, prompt = speed
    if gen <= 0 or prompt <= 0:
        return None
    return generated / gen + scored / prompt


AGREE_PROMPTS = 5      # greedy agreement is checked on the first few held-out prompts
AGREE_TOKENS = 16      # ... over this many generated tokens
# The perplexity comparison scores at most this many chunks (half of each chunk is scored: 8 x 64 tokens at
# the largest context). The quant's change is a paired measure (same text, same chunks), so it settles long
# before the absolute PPL does; the cap keeps the check's cost fixed whatever the eval file's size, which
# matters most for a big model on a CPU build of llama.cpp.
PPL_CHUNKS = 8


def reference_request(examples: list[tuple[str, str]] | None) -> hf_generate.Request | None:
    """What the merged model's greedy reference answers: the first held-out prompts, AGREE_TOKENS each."""
    if not examples:
        return None
    return hf_generate.Request([p for p, _ in examples][:AGREE_PROMPTS], AGREE_TOKENS)


def ppl_ctx(tokenizer_json: Path, text: str) -> int:
    """A llama-perplexity context that gives at least two chunks of the reference text (at most 128 tokens)."""
    from tokenizers import Tokenizer

    n = len(Tokenizer.from_file(str(tokenizer_json)).encode(text).ids)
    ctx = 128
    while ctx > 16 and 2 * ctx > n:
        ctx //= 2
    return ctx


def export_fidelity(model_dir: Path, out_dir: Path, report: ExportReport, examples: list[tuple[str, str]],
                    hf: list[str] | None, *, hf_skipped: str = "", note: Callable[[str], None] | None = None) -> dict:
    """HF vs f16 greedy agreement; per quant, agreement with f16 and the perplexity change on reference answers.

    `examples` are held-out (prompt in the training format, reference answer or ""); `report` is the export's,
    whose `files` entries get each quant's agreement and perplexity. `hf`: the merged model's answers to
    `reference_request(examples)` (None: not computed, for the reason `hf_skipped`).
    """
    ll = llamacpp.locate()
    tok_json = model_dir / "tokenizer.json"
    files = report.files
    f16_kind = report.unquantized_kind
    f16 = out_dir / files[f16_kind].path
    req = reference_request(examples)
    few = req.prompts
    measured: list = []
    ref = gguf_continuations(ll, f16, few, AGREE_TOKENS, tok_json, speed=measured)
    result = {"hf_vs_" + f16_kind: agreement(hf, ref, tok_json, AGREE_TOKENS) if hf is not None
              else {"skipped": hf_skipped or "no HF reference"}}
    ref_file = reference_text(examples, out_dir / "reference.txt")
    ctx = ppl_ctx(tok_json, ref_file.read_text("utf-8")) if ref_file else None
    quants = len(files) - 1
    generated = len(few) * AGREE_TOKENS * quants
    scored = (PPL_CHUNKS * ctx * (quants + 1)) if ctx else 0    # at most: the text may hold fewer chunks
    est = checks_seconds(measured[0], generated=generated, scored=scored)
    result["timing"] = {"tokens_per_second": [round(x, 2) for x in measured[0]], "generated_tokens": generated,
                        "scored_tokens_max": scored, "estimated_max_seconds": est and round(est, 3)}
    if note and est is not None:
        note(f"checks: {generated} tokens to generate and at most {scored} to score, at {measured[0][0]:.0f} and "
             f"{measured[0][1]:.0f} tokens/s measured on {f16_kind}: at most {duration(est)}")
    base_ppl = llamacpp.perplexity(ll, f16, ref_file, ctx=ctx, chunks=PPL_CHUNKS)[0] if ref_file else None
    if base_ppl is not None:
        files[f16_kind].perplexity = base_ppl
    for q, info in files.items():
        if q == f16_kind:
            continue
        gguf = out_dir / info.path
        info.agreement_with_unquantized = agreement(gguf_continuations(ll, gguf, few, AGREE_TOKENS, tok_json), ref,
                                                           tok_json, AGREE_TOKENS)
        if ref_file:
            ppl = llamacpp.perplexity(ll, gguf, ref_file, ctx=ctx, chunks=PPL_CHUNKS)[0]
            info.perplexity = ppl
            info.perplexity_change_pct = round(100 * (ppl - base_ppl) / base_ppl, 2)
    result["reference"] = {"rows_with_answers": sum(bool(a) for _, a in examples), "ppl_ctx": ctx,
                           "ppl_max_chunks": PPL_CHUNKS}
    return result
