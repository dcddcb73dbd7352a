from pathlib import Path

import pytest

from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.recipe.load import load_recipe

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
name: t
base_model: ./model
dataset:
  path: data.jsonl
ollama:
  model: tutor
"""


def write(tmp_path: Path, text: str | bytes) -> Path:
    p = tmp_path / "recipe.yml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def test_demo_recipe_loads_and_resolves_paths():
    r = load_recipe(REPO / "recipes" / "demo.yml")
    assert r.name == "demo"
    assert r.resolve(r.dataset.path) == (REPO / "recipes" / "data" / "python_tutor.jsonl").resolve()
    assert r.export.quant_types == ["Q4_K_M"]
    assert r.trust_remote_code is False and r.allow_pickle_weights is False
    assert r.train.max_steps == 30 and r.eval is not None


def test_defaults_fill_a_minimal_recipe(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    assert r.method == "lora" and r.train.epochs == 1.0 and r.export.quant_types == ["Q4_K_M"]


@pytest.mark.parametrize(
    "text, expected",
    [
        (GOOD + "hardware: a: b\n", "recipe.yml:7"),                                    # malformed YAML, with line
        ("", "is empty"),
        ("- a\n- b\n", "must be a mapping"),
        (GOOD + "epochs: 3\n", "unknown key 'epochs'"),
        (GOOD.replace("dataset:", "datset:"), "did you mean 'dataset'"),
        (GOOD + "train:\n  learning_rat: 0.1\n", "did you mean 'learning_rate'"),
        (GOOD + "train:\n  sequence_len: many\n", "recipe.yml:8: train.sequence_len"),
        (GOOD + "train:\n  learning_rate: 5\n", "train.learning_rate"),
        (GOOD + "export:\n  quant_types: [Q4_KM]\n", "did you mean Q4_K_M"),
        (GOOD.replace("model: tutor", "model: My Tutor!"), "not a valid Ollama model name"),
        (GOOD.replace("name: t\n", ""), "missing required key 'name'"),
        (GOOD + "method: dora\n", "method"),
        (b"name: \xff\n", "not UTF-8"),
    ],
)
def test_bad_recipes_give_one_clear_error(tmp_path, text, expected):
    with pytest.raises(TutorWrapError) as exc:
        load_recipe(write(tmp_path, text))
    assert expected in str(exc.value)
    assert "recipe.yml" in str(exc.value)


def test_unknown_key_error_points_at_its_line(tmp_path):
    with pytest.raises(TutorWrapError) as exc:
        load_recipe(write(tmp_path, GOOD + "ollama_model: x\n"))
    assert "recipe.yml:7" in str(exc.value)
    assert "axolotl:" in str(exc.value)  # tells where Axolotl-specific keys go


def test_missing_recipe_file(tmp_path):
    with pytest.raises(TutorWrapError, match="does not exist"):
        load_recipe(tmp_path / "nope.yml")


@pytest.mark.parametrize("name", ["registry.example.com/team/tutor:v1", "team/tutor", "Tutor_2:Q4.1", "a" * 128])
def test_names_ollama_takes_are_taken(tmp_path, name):
    """[host/][namespace/]model[:tag] as Ollama's ParseName reads it: a host with dots, upper case, 128 characters."""
    assert load_recipe(write(tmp_path, GOOD.replace("model: tutor", f"model: '{name}'"))).ollama.model == name
