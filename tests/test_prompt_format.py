"""Train/serve parity, training side: our Alpaca strings are exactly what Axolotl tokenizes for training."""

import pytest

from tutor_wrap.data.alpaca import ALPACA

pytestmark = pytest.mark.tools

ROWS = [
    {"instruction": "Explain Python lists.", "input": "", "output": "A list holds items.\n\n```python\nx = [1]\n```"},
    {"instruction": "What does this error mean?", "input": "TypeError: can only concatenate str (not \"int\") to str",
     "output": "You added a str and an int."},
    {"instruction": "Unicode: café ✓ and 'quotes' \"too\"", "input": "", "output": "ok"},
]


@pytest.fixture(scope="module")
def strategy(tiny_model):
    from axolotl.prompt_tokenizers import AlpacaPromptTokenizingStrategy
    from axolotl.prompters import AlpacaPrompter
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    return AlpacaPromptTokenizingStrategy(AlpacaPrompter("instruct"), tok, False, 512), tok


@pytest.mark.parametrize("row", ROWS, ids=["no-input", "with-input", "unicode"])
def test_prompt_matches_axolotl_training_tokens(strategy, row):
    strat, tok = strategy
    ids = strat.tokenize_prompt(dict(row))
    prompt_ids = [i for i, lab in zip(ids["input_ids"], ids["labels"]) if lab == -100]
    # Axolotl masks exactly the prompt; decoding it must give our rendering byte for byte.
    assert tok.decode(prompt_ids, skip_special_tokens=True) == ALPACA.render(row["instruction"], row["input"])
    assert ids["input_ids"][0] == tok.bos_token_id
    assert ids["input_ids"][-1] == tok.eos_token_id  # the EOS the model learns to stop with


def test_prompter_strings_are_axolotls():
    from axolotl.prompters import AlpacaPrompter

    p = AlpacaPrompter("instruct")
    for row in ROWS:
        assert next(p.build_prompt(row["instruction"], row["input"])) == ALPACA.render(row["instruction"], row["input"])
