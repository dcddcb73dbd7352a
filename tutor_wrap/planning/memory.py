"""Peak GPU memory of an Axolotl (HF Trainer + PEFT + bitsandbytes) fine-tuning run, from shapes alone.

What is predicted: `torch.cuda.max_memory_reserved()` plus the CUDA context, i.e. what nvidia-smi shows for the
training process at its peak. `Breakdown.allocated` and `Breakdown.reserved` give the torch-counter views too, so
published figures of either kind can be compared (bench/memory_bench.py).

Stdlib only: no torch/transformers/axolotl import (the planner calls this on machines without a GPU, in ms).

Calibration and error: see bench/README.md (dev set of published measurements, median/max abs % error).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.core.units import GIB
from tutor_wrap.models.catalog import Architecture, resolve_targets


METHODS = ("full", "lora", "lora8bit", "qlora")
OPTIMIZERS = ("adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
ATTNS = ("eager", "sdpa", "flash")
LOSSES = ("standard", "chunked", "cce")
DTYPES = ("bf16", "fp16", "fp32")
SHARDINGS = ("none", "ddp", "zero2", "zero3", "fsdp")

# ---- constants (each with its reason) --------------------------------------------------------------------------
# NF4 with double quantization: 4 bits + an 8-bit absmax per 64-weight block + an fp32 scale per 256 blocks
# (bitsandbytes blocksize 64, QLoRA paper sec. 3): 0.5 + 1/64 + 4/(64*256) bytes/param.
NF4_DQ_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# LLM.int8: one int8 per weight; the fp32 per-row scale is added per output row below.
INT8_BYTES = 1.0
# CUDA context + cuBLAS/cuDNN handles + kernels of torch, bitsandbytes and flash-attn: memory nvidia-smi shows but
# no torch counter does. 0.3-2 GB in the field notes; ~0.5 GiB with lazy module loading (torch's default since
# CUDA 11.7) on A100/H100-class cards. We use 0.6 GiB.
CUDA_CONTEXT_BYTES = int(0.6 * GIB)
# Caching-allocator fragmentation: reserved exceeds the allocated peak because freed blocks of odd sizes
# (activations of different layers, logits) cannot all be reused. 5-15% is typical in LLM training logs; 8%.
ALLOCATOR_MARGIN = 0.08
# Fixed allocations besides the model: cuBLAS workspaces, the optimizer's step temporaries, the batch itself,
# RoPE caches, the 1-2 KB of per-step metrics. Measured idle-training overheads are a few hundred MB.
FIXED_OVERHEAD_BYTES = int(0.25 * GIB)


@dataclass(frozen=True)
class Knobs:
    method: str = "lora"                  # full | lora | lora8bit | qlora (nf4 + double quant)
    lora_r: int = 16
    lora_targets: str | tuple[str, ...] = "all-linear"
    seq_len: int = 2048
    micro_batch: int = 1
    grad_ckpt: bool = True
    optimizer: str = "adamw_bnb_8bit"
    attn: str = "sdpa"                    # eager | sdpa | flash
    packing: bool = False
    loss: str = "standard"                # standard (HF CE) | chunked | cce (cut cross-entropy)
    dtype: str = "bf16"                   # bf16 | fp16 | fp32
    num_gpus: int = 1
    sharding: str = "none"                # none | ddp | zero2 | zero3 | fsdp
    lora_dropout: float = 0.0             # > 0 makes PEFT keep a dropped-out copy of each adapted input
    # Only matters for full fine-tuning: with accumulation > 1 the summed gradients stay alive through the next
    # micro-batch's forward, so they add to the activations instead of replacing them.
    grad_accum: int = 1
    # PEFT's prepare_model_for_kbit_training upcasts embed_tokens/lm_head to fp32. Axolotl (0.19
    # loaders/model.py _configure_embedding_dtypes) casts them back to bf16/fp16 for lora/qlora adapters, so the
    # default is False; set True to model a plain HF+PEFT script (e.g. the Unsloth "HF+FA2" baseline).
    kbit_fp32_embeddings: bool = False

    def __post_init__(self):
        def bad(knob, value, allowed):
            raise TutorWrapError(f"memory model: {knob}={value!r} is not one of {', '.join(map(str, allowed))}",
                                 hint=f"set {knob} to one of: {', '.join(map(str, allowed))}")
        for knob, allowed in (("method", METHODS), ("optimizer", OPTIMIZERS), ("attn", ATTNS), ("loss", LOSSES),
                              ("dtype", DTYPES), ("sharding", SHARDINGS)):
            if getattr(self, knob) not in allowed:
                bad(knob, getattr(self, knob), allowed)
        for knob in ("seq_len", "micro_batch", "num_gpus", "grad_accum"):
            v = getattr(self, knob)
            if not isinstance(v, int) or v < 1:
                raise TutorWrapError(f"memory model: {knob} must be a positive integer, got {v!r}",
                                     hint=f"set {knob} to 1 or more")
        if self.method != "full" and (not isinstance(self.lora_r, int) or self.lora_r < 1):
            raise TutorWrapError(f"memory model: lora_r must be a positive integer, got {self.lora_r!r}",
                                 hint="typical values are 8, 16, 32, 64")
        if self.method != "full":
            resolve_targets(self.lora_targets)   # raises TutorWrapError on an unknown module name
        if self.num_gpus > 1 and self.sharding == "none":
            object.__setattr__(self, "sharding", "ddp")

    @property
    def tokens(self) -> int:
        # Worst case per micro-batch: every row at seq_len (packing fills rows to seq_len; without packing the
        # longest batch is what OOMs, and the planner must survive it).
        return self.seq_len * self.micro_batch


@dataclass(frozen=True)
class Breakdown:
    weights_quantized: int
    weights_16bit: int
    adapter_params_grads_optimizer: int
    activations: int
    logits_loss: int
    cuda_context: int
    allocator_margin: int
    overhead: int = 0
    # Full fine-tuning: parameter gradients are created while backward frees activations, so both never peak
    # together; this (<= 0) credit removes the overlap from the sum.
    grad_activation_overlap: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)
    predicts: str = "torch.cuda.max_memory_reserved() + CUDA context (what nvidia-smi shows for the process)"

    @property
    def allocated(self) -> int:
        """Peak torch.cuda.max_memory_allocated()."""
        return (self.weights_quantized + self.weights_16bit + self.adapter_params_grads_optimizer + self.activations
                + self.logits_loss + self.overhead + self.grad_activation_overlap)

    @property
    def reserved(self) -> int:
        """Peak torch.cuda.max_memory_reserved()."""
        return self.allocated + self.allocator_margin

    @property
    def total(self) -> int:
        """reserved + CUDA context: the nvidia-smi figure; what must fit the card."""
        return self.reserved + self.cuda_context

    def to_gib_dict(self) -> dict:
        comp = ("weights_quantized", "weights_16bit", "adapter_params_grads_optimizer", "activations",
                "logits_loss", "overhead", "grad_activation_overlap", "allocator_margin", "cuda_context")
        d = {f"{k}_gib": round(getattr(self, k) / GIB, 3) for k in comp}
        d["allocated_gib"] = round(self.allocated / GIB, 3)
        d["reserved_gib"] = round(self.reserved / GIB, 3)
        d["total_gib"] = round(self.total / GIB, 3)
        d["predicts"] = self.predicts
        d["notes"] = list(self.notes)
        return d


def _act_bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


def _layer_activation_bytes_per_token(arch: Architecture, k: Knobs) -> float:
    """Bytes autograd keeps for one decoder layer per token (no checkpointing), HF Llama/Mistral/Qwen2 layer.

    Counted tensors, in elements per token (h hidden, i intermediate, kv = kv heads * head_dim):
      2 RMSNorms (fp32 input copy + normalized output ~ 3h each in 16-bit units)          6h
      q/k/v input, q, k, v after RoPE, attention output, o_proj input                      4h + 2kv (q sized h)
      MLP input, gate output, SiLU output, up output, down_proj input (SwiGLU)            h + 4i
    = 11h + 2kv + 4i; 209 KB/token/layer for Llama-3-8B in bf16, consistent with Korthikanti et al. 2022's
    34*h bytes for a 4h-MLP GPT layer once the 3.5h SwiGLU MLP is accounted for.
    """
    a = _act_bytes(k.dtype)
    h, i = arch.hidden_size, arch.intermediate_size
    kv = arch.num_kv_heads * arch.head_dim
    q = arch.num_heads * arch.head_dim
    elems = 6 * h + 3 * q + h + 2 * kv + h + 4 * i
    b = elems * a
    if k.method != "full":
        shapes = arch.linear_shapes()
        for name in resolve_targets(k.lora_targets):
            fan_in = shapes[name][0]
            b += k.lora_r * a                         # A's output, saved as B's input
            if k.lora_dropout > 0:
                b += fan_in * (a + 1)                 # PEFT: one dropped-out copy + bool mask per adapted module
    return b


def _attention_quadratic_bytes(arch: Architecture, k: Knobs) -> int:
    """Eager attention materializes (heads x seq x seq) scores per sequence: softmax output saved per layer."""
    if k.attn != "eager":
        return 0   # sdpa (flash / mem-efficient kernels) and flash-attn keep only O(seq) logsumexp
    a = _act_bytes(k.dtype)
    # HF eager: softmax in fp32 then cast back; the 16-bit probabilities are saved for backward (dropout 0).
    return arch.num_heads * k.seq_len * k.seq_len * a * k.micro_batch


def _logits_bytes_per_token(arch: Architecture, k: Knobs, head_fp32: bool) -> float:
    """Logits + cross-entropy per token, in bytes per vocab entry times vocab.

    standard (transformers ForCausalLMLoss): 16-bit logits kept by the output (2V) + `.float()` copy feeding
    log_softmax (4V) + saved log_softmax (4V) + its gradient (4V) -> 14 B/token/vocab; with an fp32 lm_head
    (plain PEFT k-bit prep) there is no 16-bit copy: 4V logits + 4V saved + 2 x 4V grads = 16 B.
    chunked (axolotl chunked_cross_entropy / torchtune CEWithChunkedOutputLoss): 16-bit logits kept, fp32 work
    only per chunk -> ~2.5 B.  cce (Apple Cut Cross-Entropy): logits never materialized -> ~0, a few B/token.
    """
    V = arch.vocab_size
    if k.loss == "cce":
        return 16.0
    if k.loss == "chunked":
        return 2.5 * V if not head_fp32 else 4.5 * V
    return 16.0 * V if head_fp32 else 14.0 * V


def _weights(arch: Architecture, k: Knobs, notes: list[str]) -> tuple[float, float, bool]:
    """(quantized weight bytes, 16/32-bit weight bytes, whether the head is fp32) on one GPU."""
    w16 = 4 if k.dtype == "fp32" else 2
    n = k.num_gpus if k.sharding != "none" else 1
    head_fp32 = k.dtype == "fp32"
    if k.method in ("qlora", "lora8bit"):
        if k.method == "qlora":
            wq = arch.decoder_linear_params * NF4_DQ_BYTES
        else:
            out_rows = arch.num_layers * sum(fo for _, fo in arch.linear_shapes().values())
            wq = arch.decoder_linear_params * INT8_BYTES + out_rows * 4   # + fp32 per-row scale (LLM.int8)
        emb_bytes = 4 if k.kbit_fp32_embeddings else w16
        if k.kbit_fp32_embeddings:
            head_fp32 = True
            notes.append("embed_tokens/lm_head in fp32 (PEFT prepare_model_for_kbit_training, no Axolotl recast)")
        rest = arch.non_quantized_params - arch.embedding_params - arch.lm_head_params   # norms, biases
        w16_total = (arch.embedding_params + arch.lm_head_params) * emb_bytes + rest * 4  # norms/biases upcast fp32
    else:
        wq = 0
        if k.method == "full" and k.dtype == "fp16":
            # fp16 cannot be trained pure (loss-scaled fp16 grads need fp32 master weights): AMP keeps fp32 weights.
            w16_total = arch.total_params * 4
            notes.append("full fp16: fp32 master weights under AMP")
        else:
            # Axolotl loads the model in the training dtype and, for full fine-tuning in bf16, trains it pure bf16
            # (weights, grads and AdamW states all bf16), as torchtune does.
            w16_total = arch.total_params * w16
    if k.sharding in ("zero3", "fsdp"):
        # Parameters sharded; one layer's full weights are gathered at a time (plus prefetch of the next).
        layer_w = (sum(arch.linear_params_per_layer().values()) * (NF4_DQ_BYTES if k.method == "qlora" else w16))
        wq = wq / n + (2 * layer_w if k.method == "qlora" else 0)
        w16_total = w16_total / n + (0 if k.method == "qlora" else 2 * layer_w)
    return wq, w16_total, head_fp32


def _trained(arch: Architecture, k: Knobs, notes: list[str]) -> tuple[float, float, float]:
    """(trainable parameter, gradient, optimizer-state bytes) on one GPU."""
    n = k.num_gpus if k.sharding != "none" else 1
    eight_bit = k.optimizer in ("adamw_bnb_8bit", "paged_adamw_8bit")
    if k.method == "full":
        trainable = arch.total_params
        grad_b = 4 if k.dtype in ("fp32", "fp16") else 2          # grads in the parameter dtype (fp32 master for fp16)
        param_b = 0                                               # already counted in weights_16bit
        # torch AdamW keeps exp_avg/exp_avg_sq in the parameter dtype: 2 x 2 B for pure bf16, 2 x 4 B otherwise.
        # bitsandbytes 8-bit: 2 x 1 B + block absmax (~2.03 B/param together).
        state_b = 2.03 if eight_bit else (4 if k.dtype == "bf16" else 8)
    else:
        trainable = arch.lora_params(k.lora_r, k.lora_targets)
        # PEFT (autocast_adapter_dtype=True) keeps adapter weights in fp32, so their grads are fp32 too.
        param_b, grad_b = 4, 4
        state_b = 2.03 if eight_bit else 8
    params_part = trainable * param_b
    grads_part = trainable * grad_b
    states_part = trainable * state_b
    if k.optimizer.startswith("paged"):
        notes.append("paged optimizer: states are CUDA managed memory (evictable to CPU, invisible to torch "
                     "counters); counted here so the plan never relies on paging")
    if k.sharding == "zero2":
        grads_part /= n
        states_part /= n
    elif k.sharding in ("zero3", "fsdp"):
        grads_part /= n
        states_part /= n
        params_part /= n
    elif k.sharding == "ddp":
        # DDP gradient buckets: a second copy of the trainable grads for the all-reduce.
        grads_part *= 2
    return params_part, grads_part, states_part


def _activations(arch: Architecture, k: Knobs) -> float:
    T = k.tokens
    a = _act_bytes(k.dtype)
    per_layer_tok = _layer_activation_bytes_per_token(arch, k)
    quad = _attention_quadratic_bytes(arch, k)
    if k.grad_ckpt:
        # HF checkpointing keeps each layer's input (h per token) and recomputes one layer at a time during
        # backward, so only one layer's full activations (+ its attention scores) are alive at once.
        acts = arch.num_layers * T * arch.hidden_size * a + T * per_layer_tok + quad
    else:
        acts = arch.num_layers * (T * per_layer_tok + quad)
    acts += T * arch.hidden_size * a * 2          # embedding output and final-norm output
    if k.packing and k.attn in ("eager", "sdpa"):
        # Without flash-attn varlen, packed rows need a 4D block-diagonal mask (seq x seq per row).
        acts += k.micro_batch * k.seq_len * k.seq_len * a
    if k.method in ("qlora", "lora8bit"):
        # bitsandbytes dequantizes one projection to 16-bit for forward and again for backward.
        biggest = max(fi * fo for fi, fo in arch.linear_shapes().values())
        acts += 2 * biggest * a
    return acts


def estimate(arch: Architecture, knobs: Knobs) -> Breakdown:
    k = knobs
    notes: list[str] = []
    wq, w16_total, head_fp32 = _weights(arch, k, notes)
    params_part, grads_part, states_part = _trained(arch, k, notes)
    adapter = params_part + grads_part + states_part
    acts = _activations(arch, k)
    logits = k.tokens * _logits_bytes_per_token(arch, k, head_fp32)

    overlap = 0
    if k.method == "full" and k.grad_accum == 1:
        # Without accumulation (HF Trainer zero_grad(set_to_none=True) after each step) the full model's
        # gradients appear while backward frees the activations; the peak is the larger of (activations +
        # logits) and (grads), not their sum. With accumulation the grads live through the next forward.
        overlap = -int(min(grads_part, acts + logits))

    allocated = wq + w16_total + adapter + acts + logits + FIXED_OVERHEAD_BYTES + overlap
    margin = ALLOCATOR_MARGIN * allocated
    return Breakdown(
        weights_quantized=int(wq),
        weights_16bit=int(w16_total),
        adapter_params_grads_optimizer=int(adapter),
        activations=int(acts),
        logits_loss=int(logits),
        cuda_context=CUDA_CONTEXT_BYTES,
        allocator_margin=int(margin),
        overhead=FIXED_OVERHEAD_BYTES,
        grad_activation_overlap=overlap,
        notes=tuple(notes),
    )


def cpu_train_parts(arch: Architecture, knobs: Knobs) -> tuple[int, int]:
    """A CPU training process's peak RSS beyond its runtime floor, in two parts: (fixed: the weights and the adapter
    with its gradients and AdamW states, known exactly; per-token: activations, logits and loss, the same tensors
    as on a GPU). Without what only a GPU has (CUDA context, caching-allocator margin, cuBLAS workspaces). The
    per-token part is what the CPU's autograd holds least like the GPU model (planner.CPU_TOKEN_FACTOR)."""
    b = estimate(arch, knobs)
    fixed = b.weights_quantized + b.weights_16bit + b.adapter_params_grads_optimizer
    return int(fixed), int(b.activations + b.logits_loss + b.grad_activation_overlap)


def fits(arch: Architecture, knobs: Knobs, vram_bytes: int, safety: float = 0.10) -> bool:
    """True when the predicted nvidia-smi peak stays under (1 - safety) of the card."""
    return estimate(arch, knobs).total <= vram_bytes * (1.0 - safety)


# ---- search ----------------------------------------------------------------------------------------------------
# Throughput heuristic (relative tokens/s, only used to order candidates):
#   - tokens per micro-batch T: GPU utilization rises with T and saturates; T / (T + 2048) (0.33 at 1k tokens,
#     0.67 at 4k, 0.8 at 8k).
#   - gradient checkpointing re-runs the forward pass: about 30% slower (x 0.7).
#   - qlora dequantizes NF4 weights in every matmul: about 20-30% slower than 16-bit LoRA (x 0.75);
#     LLM.int8 matmuls are slower still (x 0.6).
#   - cut cross-entropy is about as fast as HF CE (x 1.0); 8-bit optimizers cost nothing measurable for adapters.
MICRO_BATCHES = (1, 2, 3, 4, 6, 8, 12, 16)


def throughput_score(k: Knobs) -> float:
    s = k.tokens / (k.tokens + 2048)
    if k.grad_ckpt:
        s *= 0.7
    if k.method == "qlora":
        s *= 0.75
    elif k.method == "lora8bit":
        s *= 0.6
    return s


def search(arch: Architecture, base_knobs: Knobs, vram_bytes: int, *, allow_qlora: bool = True,
           allow_flash: bool = True, allow_cce: bool = False, safety: float = 0.10,
           ) -> list[tuple[Knobs, Breakdown, str]]:
    """Candidate knob sets, fitting ones first (best expected throughput first), then the closest misses.

    Keeps seq_len, dtype, lora_r/targets and sharding from base_knobs. Tries the base method with checkpointing
    off and on; escalates to qlora only when nothing with the base method fits (and allow_qlora). For each
    combination the largest micro-batch in MICRO_BATCHES (1..16) that fits is kept. Adapters get an 8-bit AdamW;
    attention becomes flash when allow_flash (else sdpa), the loss cce when allow_cce.
    """
    b = base_knobs
    attn = "flash" if allow_flash else ("sdpa" if b.attn == "flash" else b.attn)
    loss = "cce" if allow_cce else b.loss
    max_mb = max(MICRO_BATCHES)

    def variants(method: str):
        opt = b.optimizer
        if method != "full" and not b.optimizer.endswith("8bit"):
            opt = "adamw_bnb_8bit"       # adapters: 8-bit states cost nothing in quality and save memory
        for ckpt in (False, True):
            yield dataclasses.replace(b, method=method, grad_ckpt=ckpt, optimizer=opt, attn=attn, loss=loss)

    def best_for(kn: Knobs):
        found = None
        for mb in MICRO_BATCHES:
            if mb > max_mb:
                break
            cand = dataclasses.replace(kn, micro_batch=mb)
            br = estimate(arch, cand)
            if br.total <= vram_bytes * (1 - safety):
                found = (cand, br)
            else:
                break                      # memory grows with micro-batch: no larger one fits either
        return found

    fitting: list[tuple[Knobs, Breakdown, str]] = []
    misses: list[tuple[Knobs, Breakdown, str]] = []
    methods = [b.method]
    for m in methods + (["qlora"] if allow_qlora and b.method in ("lora", "lora8bit", "full") else []):
        if m != b.method and fitting:
            break                           # escalate only if needed
        for kn in variants(m):
            hit = best_for(kn)
            if hit:
                cand, br = hit
                why = (f"{m}, grad ckpt {'on' if cand.grad_ckpt else 'off'}, micro-batch {cand.micro_batch}: "
                       f"{br.total / GIB:.1f} GiB predicted of {vram_bytes / GIB:.1f} GiB "
                       f"({safety:.0%} kept free)")
                fitting.append((cand, br, why))
            else:
                cand = dataclasses.replace(kn, micro_batch=1)
                br = estimate(arch, cand)
                misses.append((cand, br, f"does not fit: {br.total / GIB:.1f} GiB predicted at micro-batch 1"))
    fitting.sort(key=lambda t: -throughput_score(t[0]))
    misses.sort(key=lambda t: t[1].total)
    return fitting + misses
