"""Adding a GPU vendor, a dataset format or an eval answer check is one module plus one registry line: each test
here registers a throwaway one (the registry line) and runs it through the code the pipeline runs. The GGUF check
registry has its test beside the real GGUF (test_llama_server.py)."""


import pytest

from tutor_wrap.core.units import GIB
from tutor_wrap.machine.hardware import GPU
from tutor_wrap.machine.vendor import Bitsandbytes, Vendor

pytestmark = pytest.mark.unit


def _acme() -> Vendor:
    """A vendor tutor_wrap has never heard of: one 48 GB card with bf16, its own visibility variable."""
    card = GPU(vendor="acme", name="Acme X1", vram_total_bytes=48 * GIB, vram_free_bytes=48 * GIB, bf16=True)
    return Vendor(
        name="acme", label="Acme", runtime="AcmeRT", torch_build_key="torch_acme", torch_version_attr="acme",
        torch_index_tag="acme1", torch_index_note="", bnb_lib_kind="acme", bnb_major_digits=1, smi="acme-smi",
        probe=lambda: ([card], []), has_bf16=lambda g: g.bf16, bf16_detail=lambda g: "Acme X1 has bf16",
        no_bf16_finding=lambda g: None, flash_attn_wheels=False, no_flash_attn_reason="no flash-attn for Acme",
        lora_kernels=False, lora_kernels_reason="no Triton for Acme",
        bitsandbytes=lambda hw: Bitsandbytes(eight_bit=False, four_bit=False, reason="no bitsandbytes for Acme"),
        visible_env=(("ACME_VISIBLE_DEVICES",),), hide_all_env=("ACME_VISIBLE_DEVICES", "none"))


def test_a_gpu_vendor_is_one_record_and_one_line(monkeypatch, tmp_path):
    from tutor_wrap.machine import probe, software, vendors
    from tutor_wrap.planning.planner import make_plan
    from tutor_wrap.planning.preflight import hardware_findings
    from tutor_wrap.recipe.schema import Recipe

    acme = _acme()
    monkeypatch.setattr(vendors, "VENDORS", (acme, *vendors.VENDORS[1:]))   # the registry line (NVIDIA's probe out)
    hw = probe.probe(tmp_path)
    assert [g.name for g in hw.gpus] == ["Acme X1"] and hw.accelerator == "acme"
    hidden = probe.probe_gpus(env={"ACME_VISIBLE_DEVICES": ""})[0]
    assert hidden == [] or hidden[0].vendor != "acme"          # its own variable hides its cards
    r = Recipe.model_validate({"name": "t", "base_model": "NousResearch/Meta-Llama-3-8B", "method": "qlora",
                               "dataset": {"path": "d.jsonl"}, "train": {"sequence_len": 1024},
                               "ollama": {"model": "t"}})
    plan = make_plan(r, hw)
    why = {c.knob: c.reason for c in plan.choices}
    # QLoRA needs bitsandbytes' 4-bit, which the vendor's record says it lacks: LoRA in bf16, with the reasons
    assert plan.method == "lora" and why["bitsandbytes"] == "no bitsandbytes for Acme"
    assert plan.dtype == "bf16" and plan.attention != "flash" and not plan.lora_kernels
    assert any("no flash-attn for Acme" in reason for reason in why.values())
    assert vendors.hide_all_gpus()["ACME_VISIBLE_DEVICES"] == "none"   # a CPU plan's trainer cannot see its cards
    assert vendors.torch_build_label({"torch_acme": "1.2"}) == "AcmeRT 1.2"
    hardware_findings(hw)                                      # preflight asks the record, not a vendor name
    assert any(f.what for f in software.check_stack({"torch": "2.13.0", "torch_acme": None}, "acme"))


def test_a_dataset_format_is_one_module_and_one_line(monkeypatch, tmp_path):
    from tutor_wrap.data import formats
    from tutor_wrap.data.alpaca import Alpaca, load_alpaca
    from tutor_wrap.machine.profiles import load_profile
    from tutor_wrap.pipeline import plan_for
    from tutor_wrap.recipe.load import load_recipe

    class QA(Alpaca):
        """Rows of {"q", "a"}, trained in the alpaca prompt."""
        name = "qa"

        def read(self, path, *, require_output=True, key="dataset.path"):
            import json

            alpaca = path.with_suffix(".as-alpaca.jsonl")
            alpaca.write_text("".join(json.dumps({"instruction": o["q"], "input": "", "output": o.get("a", "")}) + "\n"
                                      for o in map(json.loads, path.read_text().splitlines())))
            return load_alpaca(alpaca, require_output=require_output, key=key)

    qa = QA()
    monkeypatch.setitem(formats.FORMATS, "qa", lambda _: qa)   # the registry line
    (tmp_path / "d.jsonl").write_text("".join(f'{{"q": "What is {i}+{i}?", "a": "{2 * i}"}}\n' for i in range(8)))
    (tmp_path / "e.jsonl").write_text('{"q": "What is 9+9?", "a": "18"}\n')
    (tmp_path / "r.yml").write_text(
        "name: t\nbase_model: NousResearch/Meta-Llama-3-8B\ndataset:\n  path: d.jsonl\n  format: qa\n"
        "train:\n  sequence_len: 512\neval:\n  prompts: e.jsonl\n  checks:\n    answer_match: true\n"
        "ollama:\n  model: t\n")
    prepared, verdicts = plan_for(load_recipe(tmp_path / "r.yml"), load_profile("rtx3060-12gb"), tmp_path / "run")
    assert prepared.inputs.fmt is qa and len(prepared.inputs.data.rows) == 8
    assert prepared.config["datasets"][0]["type"] == "alpaca"
    assert {v.stage for v in verdicts} >= {"train", "merge", "export"}


def test_an_eval_answer_check_is_one_module_and_one_line(monkeypatch):
    from tutor_wrap.answers import registry
    from tutor_wrap.answers.check import AnswerCheck, Verdict
    from tutor_wrap.checks.answers import judge, summarize
    from tutor_wrap.data.alpaca import ALPACA
    from tutor_wrap.recipe.schema import EvalSpec

    mentions = AnswerCheck("mentions", str, content=True, needs_reference=False,
                           judge=lambda text, word, _: Verdict(word in text, f"no {word!r}"),
                           doc="the answer mentions a word")
    monkeypatch.setitem(registry.ANSWER_CHECKS, "mentions", mentions)   # the registry line
    spec = EvalSpec.model_validate({"prompts": "e.jsonl", "checks": {"mentions": "list", "code_block": True},
                                    "primary_metric": "mentions_rate"})
    with pytest.raises(ValueError, match="checks.mentions: a string"):
        EvalSpec.model_validate({"prompts": "e.jsonl", "checks": {"mentions": 3}})
    answers = ["A list holds items.\n```python\nx = [1]\n```", "Tuples are fixed.\n```python\nt = (1,)\n```"]
    judged = [judge(a, True, ALPACA.section_markers, spec.checks) for a in answers]
    rates = summarize(judged)
    assert rates["mentions_rate"] == 0.5 and rates["all_checks_rate"] == 0.5 and rates["format_pass_rate"] == 1.0
    assert judged[1].details == {"mentions": "no 'list'"} and judged[0].passes(spec.primary_metric)


def test_the_stage_list_is_defined_once():
    from tutor_wrap import stages
    from tutor_wrap.cli import STAGES as CLI_STAGES
    from tutor_wrap.pipeline import STAGE_NAMES, STAGES

    assert STAGE_NAMES == stages.NAMES == CLI_STAGES
    assert all(callable(getattr(s, f)) for s in STAGES for f in ("inputs", "check", "run"))
