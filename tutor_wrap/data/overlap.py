"""Held-out prompts that are not held out: eval rows whose prompt or reference answer also appears among the
training rows (exactly, after normalizing case and whitespace, or as a near-copy), eval prompts repeated, and
training rows that are near-copies of each other.

Near-copies are found with MinHash LSH (datasketch) over character 5-gram shingles of the normalized text and then
confirmed with the exact Jaccard similarity of those shingles, so a pair is reported only when it really reaches `NEAR_JACCARD`: the LSH
only decides which pairs are worth comparing (all pairs of 100k x 1k rows would be 10^8 comparisons).
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

# Jaccard similarity of character 5-gram sets at which two texts count as near-copies. Characters, not words: a
# one-word edit in a 12-word prompt changes about 10 of its ~65 5-grams (Jaccard ~0.75) where it would change 3 of
# its 10 word 3-grams (0.54); unrelated questions share well under 0.3.
NEAR_JACCARD = 0.7
SHINGLE_CHARS = 5
# LSH banding: 25 bands of 5 of the 128 MinHash values. A pair at the threshold (0.7) becomes a candidate with
# probability 1 - (1 - 0.7^5)^25 = 0.99, at 0.75 0.999; at 0.3, 0.06 (candidates are confirmed exactly, so missing
# a pair costs more than comparing one too many). datasketch's own choice for 0.7 (8 x 8) finds a pair at 0.75 only
# 57% of the time.
NUM_PERM, BANDS, BAND_ROWS = 128, 25, 5
# Reference answers shorter than this ("4", "The answer is: 7") coincide by chance, not by leakage; so do answers that
# several training rows share (boilerplate): neither counts as an answer overlap.
MIN_ANSWER_WORDS = 8


def normalize(text: str) -> str:
    """Case, whitespace and Unicode compatibility forms (full-width '？' is '?') do not make a row new."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def shingles(text: str) -> set[str]:
    t = normalize(text)
    if len(t) <= SHINGLE_CHARS:
        return {t} if t else set()
    return {t[i:i + SHINGLE_CHARS] for i in range(len(t) - SHINGLE_CHARS + 1)}


def _hash(shingle: str) -> int:
    # Python's own string hash: ~20x faster than datasketch's default sha1, and valid here because the MinHashes
    # never leave this process (the hash is salted per process).
    return hash(shingle) & 0xFFFFFFFF


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


@dataclass(frozen=True)
class Text:
    line: int
    prompt: str              # one user turn (alpaca: instruction and input)
    answer: str              # the assistant turn that answers it: trained, or the eval row's reference ("" if none)
    context: str = ""        # the user turns before it in the conversation (an eval prompt is repeated only with them)


@dataclass(frozen=True)
class Pair:
    line: int                # the eval row's line (or the later training row's)
    other: int               # the training row's line (or the earlier one's)
    part: str                # "prompt", "answer" or "row"
    similarity: float        # 1.0 for an exact match after normalizing


@dataclass
class Overlap:
    exact: list[Pair] = field(default_factory=list)          # eval vs training, prompt or answer, normalized equal
    near: list[Pair] = field(default_factory=list)           # eval vs training, Jaccard >= NEAR_JACCARD, not exact
    repeated_eval: list[Pair] = field(default_factory=list)  # an eval prompt equal to an earlier one's
    near_train: list[Pair] = field(default_factory=list)     # a training row a near-copy of an earlier one

    @property
    def eval_lines(self) -> list[int]:
        """The eval rows the A/B should also be read without."""
        return sorted({p.line for p in self.exact + self.near})

    def to_dict(self) -> dict:
        def rows(pairs):
            return [{"line": p.line, "other": p.other, "part": p.part, "similarity": round(p.similarity, 3)}
                    for p in pairs]
        return {"threshold": NEAR_JACCARD, "exact": rows(self.exact), "near": rows(self.near),
                "repeated_eval": rows(self.repeated_eval), "near_train": rows(self.near_train),
                "eval_lines": self.eval_lines}


def _signatures(sets) -> np.ndarray:
    """MinHash signatures (datasketch), one row of NUM_PERM values per shingle set. `bulk` makes the permutations
    once for all of them; the same seed everywhere, so signatures of different calls compare."""
    from datasketch import MinHash

    hashes = MinHash.bulk((list(s) for s in sets), num_perm=NUM_PERM, hashfunc=_hash)
    return np.stack([m.hashvalues for m in hashes]) if hashes else np.zeros((0, NUM_PERM), dtype=np.uint64)


# The banding is done here on numpy arrays rather than with datasketch's MinHashLSH: its index keeps a Python set
# entry per band per row, 2.4 GB and 80 s for the 100k x 1k bench (bench/overlap.py), where one sorted
# uint64 key per band and row takes 20 MB. The signatures themselves are datasketch's.
_MIX = None


def _band_keys(sig: np.ndarray) -> np.ndarray:
    """One uint64 key per band and row: the band's BAND_ROWS values mixed (wrapping multiply-add)."""
    global _MIX
    if _MIX is None:
        _MIX = np.random.default_rng(0).integers(1, 2**63, size=BAND_ROWS, dtype=np.uint64) | np.uint64(1)
    bands = sig[:, :BANDS * BAND_ROWS].reshape(len(sig), BANDS, BAND_ROWS)
    with np.errstate(over="ignore"):
        return (bands * _MIX).sum(axis=2, dtype=np.uint64)


class _Index:
    """Rows by band key: the rows sharing at least one band with a query are its candidates."""

    def __init__(self, keys: np.ndarray):
        self.order = np.argsort(keys, axis=0, kind="stable")
        self.sorted = np.take_along_axis(keys, self.order, axis=0)

    def query(self, keys: np.ndarray) -> set[int]:
        out: set[int] = set()
        for b in range(BANDS):
            lo, hi = np.searchsorted(self.sorted[:, b], keys[b], side="left"), np.searchsorted(
                self.sorted[:, b], keys[b], side="right")
            out.update(self.order[lo:hi, b].tolist())
        return out


def _estimate(sig: np.ndarray, q: np.ndarray, rows: list[int]) -> np.ndarray:
    return (sig[rows] == q).mean(axis=1)


def _likely(candidates, q, sig) -> list[int]:
    """The candidates whose MinHash estimate (128 values, standard error <= 0.045) is within 0.15 of the threshold:
    the exact comparison, which makes the shingles again, only for those."""
    rows = sorted(candidates)
    if not rows:
        return []
    est = _estimate(sig, q, rows)
    return [r for r, e in zip(rows, est) if e >= NEAR_JACCARD - 0.15]


def find(train: list[Text], heldout: list[Text], rows: list[Text] | None = None, *,
         train_near_limit: int = 200_000) -> Overlap:
    """Every overlap between `heldout` and `train` (one Text per trained user turn and its answer, so a turn inside
    a longer conversation counts), repeated held-out prompts, and near-copies among the training `rows` (one Text
    per row, all its turns; default `train`), checked when there are at most `train_near_limit` of them."""
    out = Overlap()
    rows = train if rows is None else rows
    first_eval: dict[str, int] = {}
    for h in heldout:
        k = normalize(h.context + "\n" + h.prompt)
        if k in first_eval:
            out.repeated_eval.append(Pair(h.line, first_eval[k], "prompt", 1.0))
        else:
            first_eval[k] = h.line
    exact_prompt: dict[str, int] = {}
    exact_answer: dict[str, int] = {}
    shared = Counter(normalize(t.answer) for t in train)
    for t in train:
        exact_prompt.setdefault(normalize(t.prompt), t.line)
        if _distinctive(t.answer) and shared[normalize(t.answer)] == 1:
            exact_answer.setdefault(normalize(t.answer), t.line)
    matched: set[tuple[int, str]] = set()
    for h in heldout:
        if (line := exact_prompt.get(normalize(h.prompt))) is not None:
            out.exact.append(Pair(h.line, line, "prompt", 1.0))
            matched.add((h.line, "prompt"))
        if _distinctive(h.answer) and (line := exact_answer.get(normalize(h.answer))) is not None:
            out.exact.append(Pair(h.line, line, "answer", 1.0))
            matched.add((h.line, "answer"))
    if not train:
        return out
    # Only the signatures are kept (1 KiB a text); a candidate's shingles are made again from its text to confirm it.
    sig_prompt = _signatures(shingles(t.prompt) for t in train)
    sig_answer = _signatures(shingles(t.answer) for t in train)
    for part, sig, get in (("prompt", sig_prompt, lambda x: x.prompt), ("answer", sig_answer, lambda x: x.answer)):
        asked = [(h, sh) for h in heldout if (h.line, part) not in matched
                 and not (part == "answer" and not _distinctive(h.answer)) and (sh := shingles(get(h)))]
        if not asked:
            continue
        index = _Index(_band_keys(sig))
        q_sig = _signatures(sh for _, sh in asked)
        q_keys = _band_keys(q_sig)
        for (h, sh), q, k in zip(asked, q_sig, q_keys):
            cands = _likely(index.query(k), q, sig)
            if part == "answer":     # boilerplate several rows share is not a leak
                cands = [i for i in cands if shared[normalize(train[i].answer)] == 1]
            best = max(((jaccard(sh, shingles(get(train[i]))), i) for i in cands), default=None)
            if best and best[0] >= NEAR_JACCARD:
                out.near.append(Pair(h.line, train[best[1]].line, part, best[0]))
    if len(rows) <= train_near_limit:
        if rows is not train:
            sig_prompt = _signatures(shingles(t.prompt) for t in rows)
            sig_answer = _signatures(shingles(t.answer) for t in rows)
        out.near_train = _near_train(rows, sig_prompt, sig_answer)
    return out


def _distinctive(answer: str) -> bool:
    return len(answer.split()) >= MIN_ANSWER_WORDS


GROUP_LOOKBACK = 64   # in a band shared by many rows (templated data), each row is compared with this many before it


def _near_train(train: list[Text], sig_prompt, sig_answer) -> list[Pair]:
    """Training rows that are near-copies of an earlier row: prompt and answer each at the threshold (two questions
    that share a boilerplate answer are not copies). Candidates come from the signature of the whole row, the
    element-wise minimum of the two (the MinHash of a union): no third pass over the text. Rows that are the same
    text are the format reader's duplicates, reported there."""
    sig = np.minimum(sig_prompt, sig_answer)
    keys = _band_keys(sig)
    candidates: dict[int, set[int]] = {}
    for b in range(BANDS):
        order = np.argsort(keys[:, b], kind="stable")      # stable: equal keys stay in row order
        k = keys[order, b]
        starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
        ends = np.r_[starts[1:], len(k)]
        for lo, hi in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
            group = order[lo:hi].tolist()
            for pos in range(1, len(group)):
                candidates.setdefault(group[pos], set()).update(group[max(0, pos - GROUP_LOOKBACK):pos])
    out = []
    for i in sorted(candidates):
        t = train[i]
        same = (t.prompt.strip(), t.answer.strip())
        earlier = [j for j in _likely(candidates[i], sig[i], sig)
                   if (train[j].prompt.strip(), train[j].answer.strip()) != same]
        best = None
        for j in earlier:
            sim = min(jaccard(shingles(t.prompt), shingles(train[j].prompt)),
                      jaccard(shingles(t.answer), shingles(train[j].answer)))
            if best is None or sim > best[0]:
                best = (sim, j)
        if best and best[0] >= NEAR_JACCARD:
            out.append(Pair(t.line, train[best[1]].line, "row", best[0]))
    return out
