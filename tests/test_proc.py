import pytest

from tutor_wrap.core.proc import redact, tool_env

pytestmark = pytest.mark.unit


def test_tokens_and_secrets_are_redacted():
    text = ("HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyz0123 WANDB_API_KEY=abc123 password: hunter2 "
            "token hf_ABCDEFGHIJKLMNOPQRSTUVWX eos_token: </s>")
    out = redact(text)
    for secret in ("hf_abcdefghijklmnopqrstuvwxyz0123", "abc123", "hunter2", "hf_ABCDEFGHIJKLMNOPQRSTUVWX"):
        assert secret not in out
    assert "eos_token: </s>" in out  # tokenizer settings are not secrets


def test_tools_run_offline_without_telemetry():
    env = tool_env()
    assert env["HF_HUB_OFFLINE"] == "1" and env["AXOLOTL_DO_NOT_TRACK"] == "1" and env["WANDB_MODE"] == "disabled"


def test_a_token_a_tool_prints_never_reaches_its_log(tmp_path):
    """A real tool run (here a python child) prints secrets on stdout and stderr; the log file never holds them."""
    import sys

    from tutor_wrap.core.proc import run_logged

    secret = "hf_" + "Zq9" * 10
    code = (f"import sys; print('loading with HF_TOKEN={secret}'); print('api_key=sk-123456', file=sys.stderr); "
            "print('step 1 loss 2.0')")
    log = tmp_path / "tool.log"
    proc = run_logged([sys.executable, "-c", code], log)
    text = log.read_text()
    assert proc.returncode == 0 and "step 1 loss 2.0" in text
    assert secret not in text and "sk-123456" not in text and "[redacted]" in text


def test_tokens_per_second_is_the_interval_not_the_running_total():
    from tutor_wrap.runtime.progress import tokens_per_second

    # Axolotl logs the running total of trained tokens: 10,000 after 50 s, 10,600 after 55 s -> 120 tok/s
    prev = {"time": 1000.0, "tokens/total": 10_000}
    row = {"time": 1005.0, "tokens/total": 10_600}
    assert tokens_per_second(prev, row) == 120
    assert tokens_per_second({}, row) is None           # the first logged step has no interval
