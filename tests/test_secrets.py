"""No secret on disk or on screen: a credential planted in a recipe, by every kind of key and value that can carry
one, is refused before anything is written or printed, naming the key and the environment variable to use; the
token itself appears nowhere (stdout, stderr, any file of the run dir). The environment path, where credentials
belong, is checked on a whole run in tests/test_e2e.py."""

import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.tools

TOKEN = "hf_PLANTEDsecretTOKEN0123456789abcdef"
KEY = "planted-comet-key-5f1e9c"
PASSWORD = "planted-pw-77aa"

# (id, recipe edit, the key the error names, the variable it tells to set)
CASES = [
    ("tracker-api-key", lambda r: r["axolotl"].update(comet_api_key=KEY), "axolotl.comet_api_key", "COMET_API_KEY"),
    ("hub-token-key", lambda r: r["axolotl"].update(hub_token=KEY), "axolotl.hub_token", "HF_TOKEN"),
    ("password-in-a-url", lambda r: r["axolotl"].update(mlflow_tracking_uri=f"https://me:{PASSWORD}@ml.example"),
     "axolotl.mlflow_tracking_uri", "MLFLOW_TRACKING_TOKEN"),
    ("credential-in-a-url-query", lambda r: r["axolotl"].update(mlflow_tracking_uri=f"https://ml.example/?token={KEY}"),
     "axolotl.mlflow_tracking_uri", "MLFLOW_TRACKING_TOKEN"),
    ("password-in-a-path", lambda r: r["dataset"].update(path=f"https://me:{PASSWORD}@data.example/d.jsonl"),
     "dataset.path", "the variable the tool that needs it reads"),     # never "set PATH"
    ("nested-tracker-key", lambda r: r["axolotl"].update(comet_experiment_config={"api_key": KEY}),
     "axolotl.comet_experiment_config.api_key", "COMET_API_KEY"),
    ("gitlab-token-in-a-name", lambda r: r["axolotl"].update(wandb_name="glpat-" + "x1Y2z3" * 4), "axolotl.wandb_name",
     "WANDB_API_KEY"),
    ("token-as-a-url-user", lambda r: r["axolotl"].update(hub_model_id=f"https://{KEY}{KEY}@hub.example/me/m"),
     "axolotl.hub_model_id", "HF_TOKEN"),
    ("token-in-a-url-fragment", lambda r: r["axolotl"].update(mlflow_tracking_uri=f"https://ml.example/#access_token={KEY}"),
     "axolotl.mlflow_tracking_uri", "MLFLOW_TRACKING_TOKEN"),
    ("token-in-a-text", lambda r: r["ollama"].update(system=f"Use {TOKEN} for the hub."), "ollama.system",
     "HF_TOKEN"),
    ("token-in-a-list", lambda r: r["axolotl"].update(special_tokens={"additional": ["a", TOKEN]}),
     "axolotl.special_tokens.additional.1", "HF_TOKEN"),
    ("token-as-a-hub-id", lambda r: r.update(dataset={"hub": TOKEN}), "dataset.hub", "HF_TOKEN"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("command", ["plan", "run"])
def test_a_planted_secret_is_refused_and_never_written_or_printed(case, command, tiny_model, tmp_path):
    _, plant, key, env = case
    recipe = {"name": "sec", "base_model": str(tiny_model), "dataset": {"path": "data.jsonl"},
              "train": {"max_steps": 1}, "ollama": {"model": "sec"}, "axolotl": {}}
    plant(recipe)
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "data.jsonl").write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    run = tmp_path / "run"
    args = ["plan", "--json", "--out", str(run / "axolotl.yml")] if command == "plan" else \
        ["run", "--run-dir", str(run), "--until", "plan"]
    proc = subprocess.run([sys.executable, "-m", "tutor_wrap", args[0], str(tmp_path / "recipe.yml"), *args[1:]],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{key} holds" in proc.stderr and f"set {env}" in proc.stderr, proc.stderr
    for secret in (TOKEN, KEY, PASSWORD, "x1Y2z3" * 4):
        assert secret not in proc.stdout + proc.stderr
        written = [p for p in run.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()] if run.exists() else []
        assert written == []


def test_tokenizer_settings_named_token_are_not_secrets(tiny_model, tmp_path):
    """pad_token, eos_token and their kin are tokenizer settings, not credentials; a boolean hub switch is none."""
    from tutor_wrap.recipe.secrets import find_secret

    assert find_secret({"axolotl": {"special_tokens": {"pad_token": "<|pad|>", "eos_token": "</s>"},
                                    "hf_use_auth_token": True, "tokens": ["<think>"]}}) is None
