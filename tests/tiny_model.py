"""Build a tiny, real, randomly initialised Llama checkpoint for pipeline tests.

``build_tiny_llama(out_dir)`` writes a complete Hugging Face model directory
(config, safetensors weights, tokenizer, generation config) that every stage of
the tutor_wrap pipeline accepts on CPU in seconds:

* Axolotl 0.19 LoRA training on an alpaca JSONL and ``axolotl merge-lora``;
* llama.cpp ``convert_hf_to_gguf.py --outtype f16``;
* ``llama-quantize ... Q4_K_M`` with *no* fallback tensors;
* generation with ``llama-completion``.

Why each choice
---------------
Model shape (hidden 256, intermediate 512, 2 layers, 4 heads x head_dim 64, 2 KV heads)
    llama.cpp's K-quants (Q4_K, Q6_K, ...) pack rows in super-blocks of 256
    values.  A weight whose row length (its *input* dimension: hidden for
    q/k/v/o/gate/up and the embeddings, intermediate for down) is not a multiple
    of 256 is silently quantised with a fallback type (q5_0/q8_0) and the
    quantizer prints "... fallback ...".  With 256/512 every one of the 16
    quantisable tensors (2 layers x 7 projections + token_embd + output) gets a
    K-quant: Q4_K_M gives 13 x Q4_K + 3 x Q6_K (output, blk.1.attn_v,
    blk.1.ffn_down); the 5 norm vectors stay F32.  Two KV heads (GQA) exercise
    the same code paths as Llama 3 / Mistral class models; k/v weights are
    128 x 256, row length 256.  Embeddings are untied so the GGUF has a
    separate ``output`` tensor as real Llama 2/3 checkpoints do.  The vocab
    size (1023 with the default corpus) only sets the number of rows, so it
    need not be a multiple of anything.  1.70 M parameters, 6.8 MB in float32.

float32 weights (``torch_dtype: float32``)
    The CPU test path trains with ``bf16: false`` / ``fp16: false`` (fp16 matmuls
    on CPU are ~20x slower and bf16 autocast on CPU is patchy), so the checkpoint
    is stored in the dtype it will be trained and merged in: no casts at load,
    a merged model that is bit-for-bit what PEFT produced, and the converter's
    ``--outtype f16`` does the one down-cast.  At this size the 2x file size
    does not matter.

Llama-style (SentencePiece-like) BPE tokenizer
    llama.cpp's converter first looks for ``tokenizer.model`` (SentencePiece),
    then for a *Llama-style* ``tokenizer.json`` (``LlamaHfVocab``: BPE model with
    ``byte_fallback: true`` and a ``Sequence`` decoder) which it writes as
    ``tokenizer.ggml.model = "llama"`` (SPM vocab, byte tokens typed BYTE).
    Only if both fail does it treat the vocab as GPT-2 style BPE, and then it
    requires the pre-tokenizer's hash to be one it knows: an arbitrary BPE
    tokenizer fails there with "BPE pre-tokenizer was not recognized".
    So the tokenizer here is exactly what Llama 2 ships, in the form that
    transformers 5's ``LlamaTokenizer`` rebuilds itself (it ignores the
    normalizer/pre-tokenizer of tokenizer.json and re-creates them from vocab
    and merges, so we write the identical pipeline to keep raw ``tokenizers``,
    ``LlamaTokenizer`` and ``PreTrainedTokenizerFast`` in agreement):

    - ids 0, 1, 2 = ``<unk>``, ``<s>``, ``</s>``; ids 3..258 = ``<0x00>``..
      ``<0xFF>`` (byte fallback: any character not in the vocab, e.g. emoji,
      still round-trips); trained pieces follow;
    - normalizer: none; pre-tokenizer: ``Metaspace("▁", prepend_scheme="first",
      split=False)``; decoder: Replace("▁"," ") + ByteFallback + Fuse +
      Strip(1 leading space);
    - post-processor: ``<s> $A`` (add_bos_token true, add_eos_token false, as
      Llama 2).  The eos ``</s>`` is appended by the prompt strategy (Axolotl
      does this itself for ``type: alpaca``).

    The BPE merges are trained at build time with ``tokenizers``' BpeTrainer on
    ``corpus`` (default: a built-in mix of alpaca prompt lines, English and
    Python; target 1024 pieces), so "### Instruction:" / "### Response:" are
    two tokens each ("▁###", "▁Instruction:").  Merges never span a word
    start or a newline; "\n" itself is left to byte fallback (<0x0A>), as in
    Llama 2.

    Known differences, all shared with real Llama checkpoints:
    - llama.cpp's ``LlamaHfVocab`` gives every piece the score -1000 (there is
      no tokenizer.model to take scores from), so llama.cpp's SentencePiece
      tokenizer merges leftmost-first instead of by BPE rank.  Short/common
      text tokenizes identically (the alpaca template + code test string: the
      same 20 ids); long rare words can split differently (the alpaca preamble
      is 17 tokens in transformers, 25 in llama.cpp).  Don't compare ids
      across the two beyond the template.
    - Tokenized on its own (as Axolotl's alpaca strategy does) a response gets
      the Metaspace prefix "▁", so decoding a training row shows
      "### Response:\n Here ...".
    - llama-completion echoes the prompt with the leading "▁" as a space
      (" ### Instruction:"); use ``--no-display-prompt`` to get only the
      generated text.

Pad token ``<unk>``
    Llama has no pad token.  Axolotl 0.19 accepts a tokenizer without one (it
    sets ``pad_token = "</s>"`` for ``LlamaTokenizer``), but pad == eos lets
    any collator that masks pad ids in the labels also mask the real EOS, and
    then the fine-tuned model never learns to stop.  ``<unk>`` (id 0) is the
    usual Llama fine-tuning choice: no new embedding row, distinct from eos,
    and Axolotl keeps it unchanged (no ``special_tokens`` key needed).

Minimal Axolotl 0.19 config that trains it on CPU (verified)
    base_model: <out_dir>
    datasets: [{path: x.jsonl, type: alpaca, ds_type: json}]
    output_dir: <dir>
    adapter: lora
    lora_r: 8
    lora_alpha: 16          # required: None crashes in PEFT (alpha / r)
    lora_target_linear: true
    sequence_len: 256
    micro_batch_size: 2
    max_steps: 5
    learning_rate: 0.001    # required by the schema
    bf16: false
    fp16: false
    lora_mlp_kernel: false  # Triton kernels assert CUDA
    lora_qkv_kernel: false
    lora_o_kernel: false
    save_safetensors: true
    No special_tokens / tokenizer_type / pad settings are needed.  Run
    ``axolotl train`` with the venv's bin/ on PATH (it execs ``accelerate``),
    and give each run its own ``dataset_prepared_path`` (the default
    ./last_run_prepared is reused across runs by content hash).

Determinism / speed
    ``tokenizers``' BPE trainer is deterministic for a given corpus, and the
    weights come from transformers' own ``_init_weights`` (normal, std 0.02)
    under ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng`` so the
    caller's RNG state is untouched.  Same seed + corpus => byte-identical
    files.  The build itself takes ~0.25 s once torch/transformers are
    imported; a cold process needs ~3 s more for ``import torch`` and
    several seconds for transformers' own import chain (2-core box: 9-11 s in
    all, most of it imports every consumer of the model pays anyway).
    Weights are written only as safetensors.
"""

from __future__ import annotations

import json
import pathlib
from typing import Iterable

__all__ = [
    "build_tiny_llama",
    "DEFAULT_CORPUS",
    "HIDDEN_SIZE",
    "INTERMEDIATE_SIZE",
    "NUM_LAYERS",
    "NUM_HEADS",
    "NUM_KV_HEADS",
    "HEAD_DIM",
    "TARGET_VOCAB_SIZE",
    "MAX_POSITION_EMBEDDINGS",
]

HIDDEN_SIZE = 256  # multiple of 256: K-quant super-block
INTERMEDIATE_SIZE = 512  # multiple of 256: ffn_down rows
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = HIDDEN_SIZE // NUM_HEADS  # 64
TARGET_VOCAB_SIZE = 1024  # upper bound; the real size is what BPE training reaches
MAX_POSITION_EMBEDDINGS = 1024

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
PAD = UNK
SPIECE_UNDERLINE = "\u2581"  # "▁"
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]


def _default_corpus() -> list[str]:
    """A few hundred deterministic lines: alpaca template, English, Python."""
    preamble = (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request."
    )
    preamble_input = (
        "Below is an instruction that describes a task, paired with an input that "
        "provides further context. Write a response that appropriately completes the request."
    )
    topics = [
        ("lists", "x = [1, 2, 3]\nx.append(4)\nprint(len(x))"),
        ("dictionaries", "d = {\"a\": 1, \"b\": 2}\nfor key, value in d.items():\n    print(key, value)"),
        ("tuples", "point = (3, 4)\nx, y = point\nprint(x + y)"),
        ("sets", "s = {1, 2, 2, 3}\nprint(sorted(s))"),
        ("strings", "name = \"world\"\nprint(f\"hello {name}\")\nprint(name.upper())"),
        ("loops", "for i in range(10):\n    if i % 2 == 0:\n        print(i)"),
        ("functions", "def add(a, b):\n    return a + b\n\nprint(add(2, 3))"),
        ("classes", "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y"),
        ("recursion", "def fact(n):\n    return 1 if n <= 1 else n * fact(n - 1)"),
        ("exceptions", "try:\n    value = int(text)\nexcept ValueError:\n    value = 0"),
        ("files", "with open(\"data.txt\") as f:\n    lines = f.read().splitlines()"),
        ("list comprehensions", "squares = [i * i for i in range(5)]\nprint(squares)"),
        ("generators", "def count(n):\n    i = 0\n    while i < n:\n        yield i\n        i += 1"),
        ("imports", "import math\nfrom pathlib import Path\nprint(math.sqrt(16))"),
        ("sorting", "words = [\"pear\", \"apple\", \"fig\"]\nwords.sort(key=len)\nprint(words)"),
        ("while loops", "n = 10\nwhile n > 0:\n    n -= 3\nprint(n)"),
        ("slicing", "x = [0, 1, 2, 3, 4]\nprint(x[1:3], x[::-1])"),
        ("booleans", "ok = True and not False\nprint(ok is True)"),
        ("None", "result = None\nif result is None:\n    result = []"),
        ("lambda functions", "double = lambda v: v * 2\nprint(list(map(double, [1, 2])))"),
    ]
    verbs = ["Explain", "Describe", "Show an example of", "Write code that uses", "What are"]
    english = [
        "The quick brown fox jumps over the lazy dog.",
        "A list is an ordered collection of items that can be changed.",
        "A dictionary maps keys to values and looks them up quickly.",
        "A function takes arguments, does some work and returns a result.",
        "Use a for loop when you know how many times to repeat something.",
        "Python is a programming language that is easy to read and write.",
        "Variables store values so that the program can use them later.",
        "An error message tells you what went wrong and where it happened.",
        "Indentation matters in Python because it defines blocks of code.",
        "Tests check that the code does what it is supposed to do.",
        "The student asked the tutor to explain the answer step by step.",
        "This is a short answer. It is correct, clear and to the point.",
        "Here is an example:",
        "In this example, the output is printed to the screen.",
        "You can also write it in one line with a comprehension.",
        "Remember to return the value instead of printing it.",
    ]
    lines: list[str] = []
    for i, (topic, code) in enumerate(topics):
        verb = verbs[i % len(verbs)]
        instruction = f"{verb} {topic} in Python."
        answer = english[i % len(english)]
        block = f"```python\n{code}\n```"
        lines.append(
            f"{preamble}\n\n### Instruction:\n{instruction}\n\n### Response:\n{answer}\n{block}"
        )
        lines.append(
            f"{preamble_input}\n\n### Instruction:\n{instruction}\n\n### Input:\n{code}\n\n"
            f"### Response:\n{english[(i + 3) % len(english)]}"
        )
        lines.append(f"### Instruction:\n{instruction}\n\n### Response:\n{block}")
        lines.extend(code.splitlines())
    lines.extend(english)
    for verb in verbs:
        for topic, _ in topics:
            lines.append(f"{verb} {topic}.")
    return lines


DEFAULT_CORPUS: tuple[str, ...] = tuple(_default_corpus())


# The chat variant (``chat=True``): ChatML's two special tokens after the trained vocabulary, <|im_end|> as EOS,
# no BOS added (as ChatML models such as SmolLM2 and Qwen have it), and SmolLM2-Instruct's template shape with
# its own default system text: what `dataset.chat_template: tokenizer` meets on a real Instruct model.
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
CHAT_DEFAULT_SYSTEM = "You are a tiny test assistant."
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    + CHAT_DEFAULT_SYSTEM + "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _train_tokenizer(corpus: Iterable[str], *, chat: bool = False):
    """Train a Llama-2-style byte-fallback BPE; return a ``tokenizers.Tokenizer``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    texts = [t for t in corpus if t]
    if not texts:
        raise ValueError("corpus is empty")

    # 1) Train merges.  Pieces never span a "▁" word start or a newline (as in
    #    SentencePiece), so the unsplit inference pipeline below tokenizes
    #    exactly like this split training view; the prompt and the response of
    #    an alpaca row then tokenize the same alone and concatenated.
    trainer_tok = Tokenizer(models.BPE(unk_token=UNK, byte_fallback=True, fuse_unk=True))
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=SPIECE_UNDERLINE, prepend_scheme="first", split=True),
            pre_tokenizers.Split("\n", behavior="isolated"),
        ]
    )
    n_fixed = 3 + len(BYTE_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB_SIZE - len(BYTE_TOKENS),
        min_frequency=2,
        special_tokens=[UNK, BOS, EOS],
        show_progress=False,
    )
    trainer_tok.train_from_iterator(texts, trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]

    # 2) Lay the vocab out as Llama does: specials, 256 byte tokens, pieces.
    vocab: dict[str, int] = {UNK: 0, BOS: 1, EOS: 2}
    for b in BYTE_TOKENS:
        vocab[b] = len(vocab)
    assert len(vocab) == n_fixed
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    for piece, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        # "\n" is left to byte fallback (<0x0A>), as in Llama 2's vocab.
        if piece not in vocab and piece != "\n":
            vocab[piece] = len(vocab)
    assert all("\n" not in a + b for a, b in merges)

    # 3) The inference pipeline of Llama 2 / transformers 5 LlamaTokenizer.
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=UNK, fuse_unk=True, byte_fallback=True, dropout=None)
    )
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPIECE_UNDERLINE, prepend_scheme="first", split=False
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(SPIECE_UNDERLINE, " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False)
         for t in (UNK, BOS, EOS, *(CHATML_TOKENS if chat else ()))]
    )
    if not chat:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS}:0 $A:0",
            pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
            special_tokens=[(BOS, 1)],
        )
    return tok


def _write_json(path: pathlib.Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n", encoding="utf-8")


def build_tiny_llama(
    out_dir: pathlib.Path, *, seed: int = 0, corpus: Iterable[str] | None = None,
    hidden_size: int = HIDDEN_SIZE, intermediate_size: int = INTERMEDIATE_SIZE, chat: bool = False,
) -> pathlib.Path:
    """Write a tiny random Llama + Llama-style tokenizer into ``out_dir``; return it.

    Files: config.json, generation_config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json, special_tokens_map.json.
    Deterministic for a given ``seed`` and ``corpus`` (default
    :data:`DEFAULT_CORPUS`).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # --- tokenizer -------------------------------------------------------
    tok = _train_tokenizer(DEFAULT_CORPUS if corpus is None else corpus, chat=chat)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    tok.save(str(out_dir / "tokenizer.json"))
    specials = (UNK, BOS, EOS, *(CHATML_TOKENS if chat else ()))
    eos = CHATML_TOKENS[1] if chat else EOS
    eos_id = tok.token_to_id(eos)

    added_tokens_decoder = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in ((tok.token_to_id(t), t) for t in specials)
    }
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            # The chat variant's tokenizer.json adds no BOS, which transformers' LlamaTokenizer would rebuild.
            "tokenizer_class": "PreTrainedTokenizerFast" if chat else "LlamaTokenizer",
            "add_bos_token": not chat,
            "add_eos_token": False,
            "add_prefix_space": None,
            "legacy": False,
            "clean_up_tokenization_spaces": False,
            "bos_token": BOS,
            "eos_token": eos,
            "unk_token": UNK,
            "pad_token": PAD,
            "padding_side": "right",
            "model_max_length": MAX_POSITION_EMBEDDINGS,
            "added_tokens_decoder": added_tokens_decoder,
            **({"chat_template": CHAT_TEMPLATE} if chat else {}),
        },
    )
    _write_json(
        out_dir / "special_tokens_map.json",
        {"bos_token": BOS, "eos_token": eos, "unk_token": UNK, "pad_token": PAD},
    )

    # --- model -------------------------------------------------------------
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        hidden_act="silu",
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=eos_id,
        pad_token_id=0,
        use_cache=True,
        torch_dtype="float32",
    )
    config.architectures = ["LlamaForCausalLM"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=eos_id, pad_token_id=0)
    # transformers 5 always writes safetensors (its `safe_serialization` flag is gone).
    model.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys
    import time

    t0 = time.perf_counter()
    path = build_tiny_llama(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/tiny_llama"))
    print(f"built {path} in {time.perf_counter() - t0:.2f}s")
