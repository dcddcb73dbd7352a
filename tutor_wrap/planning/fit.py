"""What the planned context keeps: the training rows and the held-out eval prompts against `sequence_len`.

Axolotl handles a row longer than `sequence_len` as its `excess_length_strategy` says (drop, its default;
truncate; raise): the plan reports the rows that way, before the model is loaded.
"""

from __future__ import annotations

from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.data.jsonl import line_numbers
from tutor_wrap.recipe.resolve import Inputs
from tutor_wrap.recipe.schema import Recipe


def excess_length_strategy(recipe: Recipe) -> str:
    """Axolotl's `excess_length_strategy` as the recipe's `axolotl:` block sets it (Axolotl's default: drop)."""
    return str((recipe.axolotl or {}).get("excess_length_strategy") or "drop").lower()


def check_eval_prompts_fit(recipe: Recipe, inputs: Inputs, sequence_len: int) -> None:
    """Eval and deploy's serving check give each held-out prompt the planned context (plus the answer's tokens):
    a longer prompt would end them with an HTTP 400 from llama-server, after training."""
    too_long = [(line, n) for line, n in inputs.eval_prompt_lengths or [] if n > sequence_len]
    if too_long:
        longest = max(n for _, n in too_long)
        raise TutorWrapError(f"{recipe.resolve(recipe.eval.prompts)}: line {line_numbers([ln for ln, _ in too_long])}: "
                             f"the prompt is longer than the context the model is trained and served with "
                             f"({sequence_len} tokens; longest {longest})",
                             hint=f"shorten those prompts, or raise train.sequence_len to at least {longest}")


def rows_kept(recipe: Recipe, inputs: Inputs, sequence_len: int) -> tuple[int, list[str]]:
    """How many rows train whole at `sequence_len`, with a warning worded as Axolotl will treat the others;
    TutorWrapError when Axolotl would be left with nothing or stop at them, after loading the model."""
    rows, lengths = inputs.data.rows, inputs.lengths
    if lengths is None:
        return len(rows), []
    too_long = [row.line for row, n in zip(rows, lengths) if n > sequence_len]
    kept = len(rows) - len(too_long)
    if not too_long:
        return kept, []
    strategy = excess_length_strategy(recipe)
    where = f"{inputs.data.path}: line {line_numbers(too_long)}"
    raise_fix = f"raise train.sequence_len in the recipe to at least {max(lengths)}, or shorten those rows"
    if strategy == "raise":
        raise TutorWrapError(f"{where}: {len(too_long)} of {len(rows)} rows are longer than sequence_len "
                             f"{sequence_len} tokens (longest {max(lengths)}), and axolotl.excess_length_strategy: "
                             "raise stops training at the first", hint=raise_fix)
    if strategy == "truncate":
        return len(rows), [f"{where}: {len(too_long)} of {len(rows)} rows exceed sequence_len {sequence_len} tokens "
                           "and will be cut to it (axolotl.excess_length_strategy: truncate): the ends of their "
                           "answers, and their EOS, are not trained"]
    if kept == 0:
        raise TutorWrapError(
            f"{inputs.data.path}: every row is longer than sequence_len {sequence_len} tokens "
            f"(shortest {min(lengths)}); Axolotl drops rows that do not fit (excess_length_strategy: drop, its "
            "default) and would have none left",
            hint=f"raise train.sequence_len in the recipe to at least {min(lengths)} (longest row: {max(lengths)})",
        )
    return kept, [f"{where}: {len(too_long)} of {len(rows)} rows exceed sequence_len {sequence_len} tokens and will "
                  "be dropped by Axolotl (its excess_length_strategy: drop; set it to truncate under axolotl: to "
                  f"train their first {sequence_len} tokens instead)"]


def beyond_positions(config: dict, sequence_len: int) -> str | None:
    """A note when the planned context runs past the positions the base model was trained for: Axolotl trains on,
    and the model sees positions it never learned (quality drops), unless the config scales its rotary embedding."""
    limit = config.get("max_position_embeddings")
    if not isinstance(limit, int) or sequence_len <= limit or config.get("rope_scaling"):
        return None
    return (f"train.sequence_len {sequence_len} runs past the base model's {limit} positions "
            f"(max_position_embeddings): lower it to {limit} or less, unless you extend the context on purpose")
