"""Recipe + Hardware -> Plan: the training knobs, each with the reason it was chosen, and the memory breakdown.

On a GPU the knobs come from a search over the memory model (tutor_wrap.planning.memory): the fastest combination whose
predicted peak fits the card with a safety margin. On the CPU they come from rules (no CUDA kernels; the dtype from
bf16-against-fp32 measurements by instruction-set level, CPU_BF16_MEASURED), and the plan carries an estimate of the
time per step so a person sees when CPU training is impractical.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.units import GIB
from tutor_wrap.core.versions import version_tuple
from tutor_wrap.machine.hardware import Hardware
from tutor_wrap.machine.host import isa_level
from tutor_wrap.machine.vendors import by_name
from tutor_wrap.recipe.schema import Recipe

SAFETY = 0.10            # fraction of VRAM the plan leaves free (allocator spikes, other processes)
# Effective CPU training throughput per physical core, in FLOP/s, for fp32 LoRA through PyTorch on x86.
# Measured here: SmolLM2-135M LoRA, micro-batch 4, ~600 real tokens/step, ~6 s/step on 2 cores
# (4 x 135e6 x 600 / 6 / 2 = ~27 GFLOP/s per core).
CPU_FLOPS_PER_CORE = 27e9
IMPRACTICAL_S_PER_STEP = 120
# bf16 against fp32 training on the CPU, by ISA level, measured through Axolotl (bench/cpu_train.py on the demo's
# config, 2 threads, median seconds per step over steps 3..10, two runs): (speed-up range, final-loss change range in
# %, the CPU). Only a level measured here can be planned in bf16, and only when it wins by BF16_MIN_SPEEDUP without
# losing more than BF16_MAX_LOSS_PCT of final loss: a few percent of speed is not worth a model that learns less.
CPU_BF16_MEASURED = {"AVX512-BF16": ((1.06, 1.11), (1.2, 1.4), "an AMD EPYC with avx512f and avx512_bf16, 2026-12-04")}
BF16_MIN_SPEEDUP, BF16_MAX_LOSS_PCT = 1.2, 0.5


@dataclass(frozen=True)
class Choice:
    knob: str
    value: object
    reason: str


@dataclass
class Plan:
    accelerator: str
    method: str
    dtype: str                      # "fp32" | "fp16" | "bf16"
    micro_batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    optimizer: str
    attention: str                  # "sdpa" | "flash" | "eager"
    sample_packing: bool
    sequence_len: int
    lora_kernels: bool
    loss: str = "standard"          # "standard" | "cce"
    num_processes: int = 1
    sharding: str = "none"          # "none" | "ddp" | "zero2" | "zero3" (DeepSpeed); see tutor_wrap.planning.distributed
    memory: dict | None = None      # the memory model's breakdown in GiB, for GPU plans
    budget_gib: float | None = None
    seconds_per_step: float | None = None
    verdict: str = "fits"           # "fits" | "impractical"
    cpu_threads: int | None = None  # CPU training: OMP_NUM_THREADS for the trainer
    dataloader_workers: int | None = None   # None: Axolotl's default (one loader process per GPU)
    ram: dict | None = None         # CPU training: the predicted peak RSS per process and where it comes from
    choices: list[Choice] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        """The plan as `to_dict` wrote it (plan.json); keys a later version dropped are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in d.items() if k in known},
                      "choices": [Choice(**c) for c in d.get("choices") or []]})

    @classmethod
    def load(cls, path: Path) -> "Plan":
        return cls.from_dict(json.loads(Path(path).read_text("utf-8"))["plan"])


def _arch_for(recipe: Recipe):
    from tutor_wrap.models.catalog import lookup

    local = recipe.base_model_path()
    return lookup(str(local) if local else recipe.base_model)


def _knobs(recipe: Recipe, method: str, dtype: str, attn: str, num_gpus: int = 1, sharding: str = "none",
           eight_bit: bool = True):
    from tutor_wrap.planning.memory import Knobs

    targets = recipe.lora.targets if recipe.lora.targets == "all-linear" else tuple(recipe.lora.targets)
    return Knobs(method=method, lora_r=recipe.lora.r, lora_targets=targets, seq_len=recipe.train.sequence_len,
                 micro_batch=recipe.train.micro_batch_size or 1, grad_ckpt=False,
                 optimizer="adamw_torch" if method == "full" or not eight_bit else "adamw_bnb_8bit", attn=attn,
                 packing=True, dtype=dtype, lora_dropout=recipe.lora.dropout, num_gpus=num_gpus, sharding=sharding)


def _dtype_for(hw: Hardware) -> tuple[str, str]:
    reasons, all_bf16 = [], True
    for g in hw.gpus:
        vendor = by_name(g.vendor)
        detail = vendor.bf16_detail(g)
        if detail:
            reasons.append(detail)
        all_bf16 = all_bf16 and vendor.has_bf16(g)
    detail = "; ".join(dict.fromkeys(reasons))
    if all_bf16:
        return "bf16", (detail + ": bf16" if detail else "every GPU supports bf16")
    return "fp16", (detail + ": fp16 with loss scaling" if detail else "a GPU lacks bf16: fp16 with loss scaling")


def _gpu_plan(recipe: Recipe, hw: Hardware, choose) -> dict:
    from dataclasses import replace

    from tutor_wrap.planning.distributed import LADDER
    from tutor_wrap.planning.memory import estimate, search

    t = recipe.train
    gpu = min(hw.gpus, key=lambda g: g.vram_total_bytes)
    vram = gpu.vram_total_bytes
    n = len(hw.gpus)
    vendor = by_name(gpu.vendor)
    dtype_v, dtype_why = _dtype_for(hw)
    dtype = choose("dtype", dtype_v, dtype_why)
    flash = vendor.flash_attn_wheels and "flash-attn" in hw.packages
    attn_reason = ("flash-attn is installed for this GPU" if flash else
                   vendor.no_flash_attn_reason if not vendor.flash_attn_wheels else
                   "flash-attn is not installed here (or planning for a profile): PyTorch SDPA")
    cce = "cut-cross-entropy" in hw.packages
    arch = _arch_for(recipe)

    eight_bit, four_bit, bnb_why = True, True, ""
    method = recipe.method
    bnb = vendor.bitsandbytes(hw)
    if bnb is not None:
        eight_bit, four_bit, bnb_why = bnb.eight_bit, bnb.four_bit, bnb.reason
        choose("bitsandbytes", "4-bit ok" if four_bit else "8-bit only" if eight_bit else "unusable", bnb_why)
        if method == "qlora" and not four_bit:
            method = "lora"
        if method == "lora8bit" and not eight_bit:
            method = "lora"
    allow_qlora = method in ("qlora", "lora", "lora8bit") and four_bit
    ladder = LADDER if n > 1 else ("none",)
    attn = "flash" if flash else "sdpa"

    # This card's own measurements scale the model's figure (planning/calibration.py); 1 without any.
    from tutor_wrap.planning import calibration

    trusted = calibration.gpu_trust(hw, method)
    trust = trusted[0] if trusted else 1.0
    budget = vram * (1 - SAFETY)
    chosen = None
    misses = []
    for allow_q in ([False, True] if allow_qlora and method != "qlora" else [allow_qlora]):
        for sharding in ladder:
            base = _knobs(recipe, method, dtype, attn, num_gpus=n, sharding=sharding, eight_bit=eight_bit)
            # The search sizes each option to the card; with a trust factor, to the card as this one measures it.
            options = search(arch, base, int(vram / trust), allow_qlora=allow_q, allow_flash=flash, allow_cce=cce,
                             safety=SAFETY)
            if not eight_bit:
                # search() gives adapters an 8-bit AdamW; without a usable bitsandbytes it is the torch one
                options = [(k2, estimate(arch, k2), w)
                           for k2, w in ((replace(k, optimizer="adamw_torch"), w) for k, _, w in options)]
            fitting = [o for o in options if o[1].total * trust <= budget]
            if t.micro_batch_size:
                fitting = [o for o in fitting if o[0].micro_batch >= t.micro_batch_size] or fitting
            misses += [o for o in options if o[1].total * trust > budget]
            if fitting:
                chosen = (sharding, fitting, misses)
                break
        if chosen:
            break
    if not chosen:
        misses.sort(key=lambda o: o[1].total)
        k, br, _ = misses[0] if misses else (base, estimate(arch, base), "")
        where = f"{gpu.name} ({vram / GIB:.1f} GiB)" + (f" x {n} even with {k.sharding}" if n > 1 else "")
        raise TutorWrapError(
            f"{recipe.source}: no plan fits {where}: the smallest, {k.method} with "
            f"checkpointing at micro-batch 1 and sequence {k.seq_len}, needs {br.total * trust / GIB:.1f} GiB per GPU"
            + (f" (the memory model's figure x {trust:g}: {trusted[1]})" if trusted else ""),
            hint="lower train.sequence_len, use method: qlora, a smaller lora.r, or a larger GPU"
                 + (vendor.qlora_hint if not four_bit else ""),
        )
    sharding, fitting, misses = chosen
    k, br, why = fitting[0]
    if t.micro_batch_size and k.micro_batch > t.micro_batch_size:
        k = replace(k, micro_batch=t.micro_batch_size)
        br = estimate(arch, k)
        why = f"micro-batch {k.micro_batch} as the recipe asks: {br.total / GIB:.1f} GiB predicted"
    per_step = t.batch_size // n if t.batch_size % n == 0 else 0
    if not t.micro_batch_size and per_step and per_step % k.micro_batch:
        # keep micro-batch x accumulation x GPUs equal to the recipe's batch: the largest divisor that fits
        mb = max(d for d in range(1, k.micro_batch + 1) if per_step % d == 0)
        k = replace(k, micro_batch=mb)
        br = estimate(arch, k)
        why = f"{why}; lowered to {mb} so that it divides batch_size {t.batch_size}: {br.total / GIB:.1f} GiB predicted"
    if k.method == recipe.method:
        method_why = "as the recipe asks"
    elif recipe.method in ("qlora", "lora8bit") and bnb is not None and k.method == "lora":
        method_why = f"{recipe.method} needs bitsandbytes on {vendor.runtime} ({bnb_why}); plain LoRA fits"
    else:
        method_why = f"{recipe.method} does not fit {vram / GIB:.0f} GiB; 4-bit NF4 base weights do"
    method = choose("method", k.method, method_why)
    if trusted:
        choose("memory_trust", trust, f"the memory model's VRAM figure x {trust:g}: {trusted[1]}")
    if n > 1:
        _choose_sharding(choose, sharding, n, arch, k, vram)
    choose("micro_batch_size", k.micro_batch, f"largest that fits: {why}" + (" per GPU" if n > 1 else ""))
    choose("gradient_checkpointing", k.grad_ckpt, "needed to fit" if k.grad_ckpt else "not needed: it would cost ~30% speed")
    choose("optimizer", k.optimizer, "8-bit AdamW states: a quarter of the optimizer memory" if "8bit" in k.optimizer
           else "full fine-tune with the standard optimizer" if k.method == "full"
           else f"torch AdamW: {bnb_why}")
    choose("attention", "flash" if k.attn == "flash" else "sdpa", attn_reason)
    choose("loss", k.loss, "cut cross-entropy is installed: no full logits tensor" if k.loss == "cce"
           else "standard cross-entropy (cut_cross_entropy not installed)")
    if not vendor.lora_kernels:
        kernels, kernels_why = False, vendor.lora_kernels_reason
    elif sharding == "zero3":
        kernels, kernels_why = False, "ZeRO-3 partitions the weights that the fused LoRA kernels read directly: off"
    else:
        kernels, kernels_why = True, vendor.lora_kernels_reason
    return {"method": method, "dtype": dtype, "micro": k.micro_batch, "ckpt": k.grad_ckpt, "optimizer": k.optimizer,
            "attention": "flash" if k.attn == "flash" else "sdpa", "loss": k.loss, "packing": True,
            "memory": {**br.to_gib_dict(), "trust": trust, "trusted_total_gib": round(br.total * trust / GIB, 3)},
            "budget_gib": round(budget / GIB, 2), "kernels": kernels,
            "kernels_why": kernels_why, "sharding": sharding}


def _choose_sharding(choose, sharding: str, n: int, arch, k, vram: int) -> None:
    """State why this sharding: what the cheaper ones would need per GPU."""
    from dataclasses import replace

    from tutor_wrap.planning.distributed import LADDER
    from tutor_wrap.planning.memory import estimate

    cheaper = LADDER[:LADDER.index(sharding)]
    needs = ", ".join(f"{s} needs {estimate(arch, replace(k, sharding=s, micro_batch=1)).total / GIB:.1f} GiB"
                      for s in cheaper)
    what = {"ddp": f"DDP over {n} GPUs (accelerate launch --multi_gpu --num_processes {n}): the whole model state "
                   "fits each GPU",
            "zero2": f"DeepSpeed ZeRO-2 over {n} GPUs: optimizer states and gradients sharded, weights replicated",
            "zero3": f"DeepSpeed ZeRO-3 over {n} GPUs: weights, gradients and optimizer states sharded"}[sharding]
    choose("sharding", sharding, what + (f"; with micro-batch 1 {needs} of {vram * (1 - SAFETY) / GIB:.1f} GiB"
                                         if needs else ""))


def cpu_dtype(flags: list[str]) -> tuple[str, str]:
    """fp32 or bf16 for CPU training on a CPU with these flags, from CPU_BF16_MEASURED, with the figure as reason."""
    level = isa_level(flags)
    fp16 = "fp16 matmuls fall to a naive kernel (about 20x slower)"
    if level == "unknown":
        return "fp32", f"CPU instruction sets unknown (the profile lists no cpu_flags): {fp16}, bf16 unmeasured"
    if level not in ("AVX512-BF16", "AMX"):
        return "fp32", f"CPU ({level}): {fp16}; bf16 has no native instructions below AVX512-BF16"
    if level not in CPU_BF16_MEASURED:
        return "fp32", f"CPU ({level}): {fp16}; bf16 is not measured on this ISA yet (bench/cpu_train.py)"
    (s_lo, s_hi), (l_lo, l_hi), where = CPU_BF16_MEASURED[level]
    figure = f"bf16 measured x{s_lo:.2f}-{s_hi:.2f} per step, final loss {l_lo:+.1f} to {l_hi:+.1f}% on {where}"
    if s_lo >= BF16_MIN_SPEEDUP and max(l_lo, l_hi) <= BF16_MAX_LOSS_PCT:
        return "bf16", f"CPU ({level}): {figure}"
    return "fp32", (f"CPU ({level}): {figure}; bf16 is planned only at x{BF16_MIN_SPEEDUP} or more with at most "
                    f"{BF16_MAX_LOSS_PCT}% loss cost; {fp16}")


def cpu_seconds_per_step(params: int, tokens: int, cores: int) -> float:
    # LoRA: forward 2*N*T plus backward through the frozen weights 2*N*T (no weight gradients for them).
    return 4 * params * tokens / (CPU_FLOPS_PER_CORE * max(1, cores))


def planned_sequence_len(requested: int, lengths: list[int] | None, eval_prompt: int = 0) -> tuple[int, str]:
    """The recipe's sequence length, shortened to the longest real row (rounded up to 64) when all rows are
    shorter: memory for activations and logits grows with it, and nothing is gained past the longest row. Not
    below the longest eval prompt (`eval_prompt` tokens): eval and deploy serve the model in this context."""
    if not lengths:
        return requested, "as the recipe asks (no local tokenizer to measure the rows with)"
    longest = max(max(lengths), eval_prompt)
    if longest < requested:
        planned = min(requested, -(-longest // 64) * 64)
        what = "row" if longest == max(lengths) else "eval prompt"
        return planned, f"the longest {what} is {longest} tokens (base model's tokenizer): {requested} would only add padding"
    dropped = sum(n > requested for n in lengths)
    return requested, f"as the recipe asks; {dropped} of {len(lengths)} rows are longer and will be dropped"


def make_plan(recipe: Recipe, hw: Hardware, lengths: list[int] | None = None, processes: int | None = None,
              eval_prompt: int = 0) -> Plan:
    """`processes`: the training processes asked for (`--num-processes`); None plans one per GPU, or one on a CPU.
    `eval_prompt`: tokens of the longest eval prompt, which the planned context must hold."""
    _check_processes(hw, processes)
    seq, seq_reason = planned_sequence_len(recipe.train.sequence_len, lengths, eval_prompt)
    if seq != recipe.train.sequence_len:
        recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"sequence_len": seq})})
    t = recipe.train
    choices: list[Choice] = []

    def choose(knob: str, value, reason: str):
        choices.append(Choice(knob, value, reason))
        return value

    on_gpu = bool(hw.gpus)
    cpu_procs = processes or 1
    accel = hw.accelerator
    choose("accelerator", accel, f"{hw.source} shows {len(hw.gpus)} GPU(s)" if on_gpu else
           f"{hw.source} shows no GPU: training runs on the CPU")
    seconds = None
    verdict = "fits"
    if on_gpu:
        g = _gpu_plan(recipe, hw, choose)
        method, dtype, micro, ckpt, opt, attn, loss = (g["method"], g["dtype"], g["micro"], g["ckpt"], g["optimizer"],
                                                       g["attention"], g["loss"])
        packing = choose("sample_packing", True, "packs short rows into full sequences; Axolotl keeps rows apart "
                                                 "with varlen attention or a block-diagonal mask")
        kernels = choose("lora_kernels", g["kernels"], g["kernels_why"])
        memory, budget = g["memory"], g["budget_gib"]
        sharding = g["sharding"]
    else:
        method = recipe.method
        bnb = version_tuple(hw.packages.get("bitsandbytes"))
        if method == "qlora" and bnb is not None and bnb >= BNB_CPU_4BIT:
            choose("method", method, f"as the recipe asks: bitsandbytes {hw.packages['bitsandbytes']} quantizes the base "
                   "to NF4 on the CPU too (about LoRA's speed here; the merge then reproduces the NF4 model)")
        elif method in ("qlora", "lora8bit"):
            need = ("bitsandbytes >= " + ".".join(map(str, BNB_CPU_4BIT)) + " for 4-bit on the CPU"
                    if method == "qlora" else "bitsandbytes' 8-bit layers, which have run here only on a GPU")
            method = choose("method", "lora", f"{recipe.method} needs {need}"
                            + (f" (installed: {hw.packages['bitsandbytes']})" if bnb else " (not installed)")
                            + "; plain LoRA is used")
        else:
            choose("method", method, "as the recipe asks")
        dtype = choose("dtype", *cpu_dtype(hw.cpu_flags))
        micro, ram, lowered = _cpu_micro_batch(recipe, hw, method, dtype, cpu_procs)
        micro = choose("micro_batch_size", micro,
                       "as the recipe asks" if t.micro_batch_size else ("CPU default: small batches, no VRAM to fill"
                       + (f", {cpu_procs} processes sharing batch_size {t.batch_size}" if cpu_procs > 1 else "")
                       + (f"; {lowered}" if lowered else "")))
        if micro * cpu_procs > t.batch_size:
            # each process takes at least one micro-batch per step: the batch would silently grow
            raise TutorWrapError(f"{recipe.source}: train.batch_size {t.batch_size} is smaller than {cpu_procs} "
                                 f"processes x micro-batch {micro}",
                                 hint=f"raise train.batch_size to {micro * cpu_procs} or more, lower "
                                      "train.micro_batch_size, or use fewer processes")
        ckpt = choose("gradient_checkpointing", False, "CPU RAM holds the activations; recomputation would only slow it")
        opt = choose("optimizer", "adamw_torch", "8-bit optimizers need bitsandbytes on a GPU")
        attn = choose("attention", "sdpa", "PyTorch's SDPA; the CPU has no flash attention")
        loss = "standard"
        packing = choose("sample_packing", False, "off on the CPU: the packed-row attention paths are built for GPUs")
        kernels = choose("lora_kernels", False, "Axolotl's Triton LoRA kernels need CUDA")
        memory, budget = None, None
        sharding = "none"
        threads, why = cpu_threads(hw)
        why += " (OMP_NUM_THREADS for the trainer; accelerate's default is 1)"
        if cpu_procs > 1:
            choose("num_processes", cpu_procs, f"as asked (--num-processes): accelerate starts {cpu_procs} training "
                   "processes (torchrun), each on its share of the rows, gradients averaged over gloo every step")
            each = max(1, threads // cpu_procs)
            why = f"{threads} for the run, shared by {cpu_procs} processes: {each} each; {why}"
            threads = each
        choose("cpu_threads", threads, why)
        workers = choose("dataloader_workers", 0, "the trainer reads its batches itself: the rows are tokenized "
                         "before training, and the training processes already use every core given to them (loader "
                         "processes, Axolotl's default of one per process, would take cores from them and be forked "
                         "from a process whose threads are running)")
        try:
            params = _arch_for(recipe).total_params
        except TutorWrapError:
            params = None
        if ram:
            choose("ram", f"~{ram['per_process_bytes'] / GIB:.1f} GiB" + (f" x {cpu_procs} processes" if cpu_procs > 1
                                                                         else ""),
                   f"peak RSS of a training process: {ram['runtime_bytes'] / GIB:.2f} GiB runtime + "
                   f"{ram['fixed_bytes'] / GIB:.2f} GiB of weights and adapter with AdamW states + {ram['factor']:g} x "
                   f"{ram['model_part_bytes'] / GIB:.2f} GiB of activations and logits for {micro} x "
                   f"{t.sequence_len} tokens in {dtype}; {ram['basis']}")
        if params:
            cores = threads * cpu_procs
            seconds = cpu_seconds_per_step(params, micro * t.sequence_len, cores)
            if seconds > IMPRACTICAL_S_PER_STEP:
                verdict = "impractical"
            choose("time_per_step", f"~{seconds:.0f} s", f"{params / 1e9:.2f}B parameters x {micro * t.sequence_len} "
                   f"tokens on {cores} CPU cores at ~{CPU_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s each"
                   + ("; impractical: use a GPU (see the rtx3060-12gb plan)" if verdict == "impractical" else ""))
    procs = max(1, len(hw.gpus)) if on_gpu else cpu_procs
    accum = max(1, t.batch_size // (micro * procs))
    choose("gradient_accumulation_steps", accum, f"keeps the effective batch at {micro * accum * procs} "
           f"(recipe batch_size {t.batch_size}" + (f"; micro-batch x accumulation x {procs} "
                                                   f"{'GPUs' if on_gpu else 'processes'})" if procs > 1 else ")"))
    choose("sequence_len", t.sequence_len, seq_reason)
    return Plan(
        accelerator=accel, method=method, dtype=dtype, micro_batch_size=micro, gradient_accumulation_steps=accum,
        gradient_checkpointing=ckpt, optimizer=opt, attention=attn, sample_packing=packing,
        sequence_len=t.sequence_len, lora_kernels=kernels, loss=loss, num_processes=procs, sharding=sharding,
        memory=memory, budget_gib=budget, seconds_per_step=seconds, verdict=verdict, choices=choices,
        cpu_threads=None if on_gpu else threads, ram=None if on_gpu else ram,
        dataloader_workers=None if on_gpu else workers,
    )


# A CPU training process's peak RSS = runtime + weights and adapter states + CPU_TOKEN_FACTOR x the memory model's
# activations and logits. Runtime: Python, torch, transformers, Axolotl, accelerate and the dataset pipeline. Both
# from bench/calibration.py --stage train (fp32 LoRA r16 on all linear layers, 2026-12-04, an AMD EPYC with
# AVX-512, torch 2.13 CPU): the tiny model's peak (0.91 GiB at 868 tokens per batch) is nearly all runtime, and
# SmolLM2-135M's peaks at 106, 556 and 1288 tokens (1.77, 3.40, 6.06 GiB) lie on one line of 1.26 x the memory
# model's activations and logits (which counts what a GPU keeps; the CPU's attention and loss keep more) above a
# runtime of 0.81-0.82 GiB. Set a little above both, so that the first prediction errs on the safe side; what
# this machine measures replaces them (planning/calibration.py).
CPU_TRAIN_RUNTIME_BYTES = int(0.85 * GIB)
CPU_TOKEN_FACTOR = 1.3
CPU_TRAIN_BASIS = "the memory model's tensors, the published CPU runtime and per-token factor (bench/calibration.py)"


def _cpu_micro_batch(recipe: Recipe, hw: Hardware, method: str, dtype: str, procs: int) -> tuple[int, dict | None, str]:
    """(micro-batch, its RAM prediction, why it was lowered) for CPU training: the recipe's, or up to 4 lowered
    until every process's predicted peak RSS fits the free RAM. A plan that cannot fit is refused here, as a GPU
    plan that fits no card is: preflight's verdict and the plan say the same."""
    t = recipe.train
    wanted = t.micro_batch_size or max(1, min(t.batch_size // procs, 4))
    free = hw.ram_available_bytes

    def need(m: int) -> dict | None:
        return cpu_train_ram(recipe, hw, method, dtype, m * t.sequence_len, procs)

    micro, ram = wanted, need(wanted)
    if ram is None or ram["per_process_bytes"] * procs <= free:
        return micro, ram, ""
    while not t.micro_batch_size and micro > 1 and ram["per_process_bytes"] * procs > free:
        micro -= 1
        ram = need(micro)
    each = f"{ram['per_process_bytes'] / GIB:.1f} GiB" + (f" x {procs} processes" if procs > 1 else "")
    if ram["per_process_bytes"] * procs <= free:
        return micro, ram, (f"lowered from {wanted}: at {micro} training needs {each} of the {free / GIB:.1f} GiB "
                            f"of RAM free ({hw.source})")
    params = _arch_for(recipe).total_params
    if cpu_seconds_per_step(params, micro * t.sequence_len, cpu_threads(hw)[0]) > IMPRACTICAL_S_PER_STEP:
        raise TutorWrapError(
            f"{recipe.source}: CPU training at micro-batch {micro} and sequence {t.sequence_len} needs {each} of RAM "
            f"(predicted peak RSS), {free / GIB:.1f} GiB free ({hw.source}), and would be impractical anyway "
            f"({params / 1e9:.1f}B parameters on {cpu_threads(hw)[0]} cores)",
            hint="train on a GPU (`plan RECIPE --hardware rtx3060-12gb` shows one)")
    raise TutorWrapError(
        f"{recipe.source}: CPU training at micro-batch {micro} and sequence {t.sequence_len} needs {each} of RAM "
        f"(predicted peak RSS, {ram['basis']}), {free / GIB:.1f} GiB free ({hw.source})",
        hint=", ".join((["lower train.micro_batch_size"] if t.micro_batch_size and micro > 1 else [])
                       + ["lower train.sequence_len"] + (["use fewer processes"] if procs > 1 else [])
                       + ["or close programs that hold RAM"]))


def cpu_train_ram(recipe: Recipe, hw: Hardware, method: str, dtype: str, tokens: int, procs: int = 1) -> dict | None:
    """The predicted peak RSS of each CPU training process whose largest micro-batch holds `tokens` tokens (the
    plan: micro-batch x sequence length; a finished run: the largest batch it drew). None for a model the catalog
    cannot size."""
    from dataclasses import replace

    from tutor_wrap.planning import calibration
    from tutor_wrap.planning.memory import cpu_train_parts

    try:
        arch = _arch_for(recipe)
    except TutorWrapError:
        return None
    # Tokens as one sequence: with SDPA (no seq x seq scores) and no packing every tensor counted grows with the
    # batch's tokens, however they split into rows.
    knobs = replace(_knobs(recipe, method, dtype, "sdpa", eight_bit=False), micro_batch=1, seq_len=max(1, tokens),
                    packing=False)
    fixed, per_token = cpu_train_parts(arch, knobs)
    runtime, factor, basis = CPU_TRAIN_RUNTIME_BYTES, CPU_TOKEN_FACTOR, CPU_TRAIN_BASIS
    if fit := calibration.fit(hw, "train-cpu", CPU_TRAIN_RUNTIME_BYTES, CPU_TOKEN_FACTOR, method=method, dtype=dtype):
        runtime, factor, basis = fit.runtime_bytes, fit.factor, fit.basis
    return {"per_process_bytes": int(runtime + fixed + factor * per_token), "processes": procs, "runtime_bytes": runtime,
            "fixed_bytes": fixed, "model_part_bytes": per_token, "factor": factor, "basis": basis, "method": method,
            "dtype": dtype,
            "tokens": tokens,
            "predicts": "the peak RSS of each training process (the kernel's high-water mark)"}


def _check_processes(hw: Hardware, processes: int | None) -> None:
    if processes is None:
        return
    if processes < 1:
        raise TutorWrapError(f"--num-processes {processes}: at least 1")
    if hw.gpus and processes != len(hw.gpus):
        raise TutorWrapError(
            f"--num-processes {processes}: {hw.source} shows {len(hw.gpus)} GPU(s), and a GPU plan runs one process "
            "per GPU", hint="leave --num-processes out, or choose the GPUs with CUDA_VISIBLE_DEVICES (ROCm: "
                            "HIP_VISIBLE_DEVICES) before running")
    cpus = hw.cpu_usable or hw.cpu_count
    if not hw.gpus and cpus and processes > cpus:
        raise TutorWrapError(f"--num-processes {processes}: this process may use {cpus} CPU(s); more training "
                             "processes than CPUs would only take turns on them",
                             hint=f"use --num-processes {cpus} or fewer")


# bitsandbytes' CPU backend trains NF4 (QLoRA) bases: seen here with 0.50.2 (issue 22's measurements).
BNB_CPU_4BIT = (0, 50, 0)


def cpu_threads(hw: Hardware) -> tuple[int, str]:
    """Math threads for CPU work (training, generation): one per physical core this process may use, less the cores other work keeps
    busy. accelerate runs a single CPU process with OMP_NUM_THREADS=1 unless told otherwise: one core of many.
    Hyper-threads share a core's vector units, and a thread that shares its core with a busy process holds every
    other thread up at each synchronisation (seen here: 2 threads slower than 1 beside a busy process). The
    probe samples the CPUs for a moment, so a build that just ended does not count."""
    physical = hw.cpu_physical_cores or hw.cpu_count
    usable = min(physical, hw.cpu_usable or physical)
    why = f"{usable} physical core(s) this process may use"
    if hw.cpu_usable and hw.cpu_usable < physical:
        why = f"{hw.cpu_usable} of the machine's CPUs are allowed to this process (affinity)"
    logical = max(hw.cpu_count, physical)
    busy = round((hw.cpu_busy or 0.0) * physical / logical)   # physical cores' worth of other work right now
    threads = max(1, usable - busy)
    if threads < usable:
        why += f"; {busy} kept busy by other work ({hw.cpu_busy:.1f} CPUs in use when probed), so {threads}"
    return threads, why
