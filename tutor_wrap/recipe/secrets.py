"""Secrets have no place in a recipe: its values are written into the run dir (the Axolotl YAML, the trainer's
launch copy, the adapter's model card that people push to the Hub) and printed (`plan --json`). Trackers and the
hub read their credentials from the environment, which tutor_wrap hands to the trainer untouched; so a recipe
that carries one is refused with the variable to set instead, before anything is written or printed.
"""

from __future__ import annotations

import re
from typing import Any

# Key names that hold credentials (Axolotl's comet_api_key, a hub token, tracker passwords). "*_token" alone is
# not one: pad_token, eos_token and their kin are tokenizer settings.
_SECRET_KEY = re.compile(r"(?i)(api_?key|secret|passw(or)?d|access_token|auth_token|hf_token|hub_token|credential)")
# Values that are credentials whatever key holds them.
_SECRET_VALUE = (
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}"), "a Hugging Face token", "HF_TOKEN"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"), "an API key", None),
    (re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"), "a GitHub token", None),
    (re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}"), "a GitLab token", None),
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "an AWS access key", None),
    (re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"), "a Slack token", None),
    (re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s@:]{16,}@"), "a URL with a token as its user name", None),
    (re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@"), "a URL with a password in it", None),
    (re.compile(r"(?i)[?&#](access_|auth_|api_|private_)?(token|key|apikey|secret|password|passwd|sig|signature)=[^&#\s]+"),
     "a URL with a credential in its query", None),
)
# The variable each tracker or hub reads its credential from, by the key's prefix.
_ENV_FOR = (("comet", "COMET_API_KEY"), ("wandb", "WANDB_API_KEY"), ("mlflow", "MLFLOW_TRACKING_TOKEN (or "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)"), ("hf", "HF_TOKEN"), ("hub", "HF_TOKEN"))


def _env_for(keys: list[str], default: str | None, named: bool) -> str:
    """The variable to set instead: a tracker's or the hub's own when a key on the path names one; a secret-named
    key's own name otherwise; for a credential found in a value, the hub's (hf_ tokens) or a general word."""
    for key in reversed(keys):
        low = key.lower()
        found = next((env for prefix, env in _ENV_FOR if low.startswith(prefix)), None)
        if found:
            return found
    if default:
        return default
    if named and keys:
        return f"{keys[-1].upper()} (or the variable the tool that needs it reads)"
    return "the variable the tool that needs it reads (HF_TOKEN for the hub)"


def find_secret(data: Any, path: tuple = ()) -> tuple[tuple, str, str] | None:
    """(the key path, what it holds, the environment variable to use instead) of the first credential in a
    recipe's raw data; None when it carries none. The value itself is never returned or shown."""
    if isinstance(data, dict):
        for key, value in data.items():
            here = (*path, key)
            if isinstance(value, str) and value.strip() and _SECRET_KEY.search(str(key)):
                return here, "a credential", _env_for([str(p) for p in here if isinstance(p, str)], None, True)
            found = find_secret(value, here)
            if found:
                return found
    elif isinstance(data, list):
        for i, item in enumerate(data):
            found = find_secret(item, (*path, i))
            if found:
                return found
    elif isinstance(data, str):
        for pattern, what, env in _SECRET_VALUE:
            if pattern.search(data):
                return path, what, _env_for([str(p) for p in path if isinstance(p, str)], env, False)
    return None
