from tutor_wrap.core.proc import redact, tool_env


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
