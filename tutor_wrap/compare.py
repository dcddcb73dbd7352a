"""Runs side by side: `runs` lists what a folder of run dirs holds, `compare` sets two or more runs against the
first one: what differs in what the trainer and the eval got, the loss curves on one plot, the eval metrics per
arm, and between the fine-tuned models on the held-out prompts they share the paired test the eval itself uses
(checks/stats.paired: wins, losses, ties, exact McNemar p) on the primary metric.

Everything is read from the run dirs (manifest.json, axolotl.yml, plan.json, train/metrics.jsonl,
eval/report.json): a run is compared as it was run, whatever its recipe file says now.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tutor_wrap.backends.axolotl_metrics import loss_points, read_metrics
from tutor_wrap.checks.answers import Judged
from tutor_wrap.checks.stats import paired
from tutor_wrap.core import atomic
from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.stages import NAMES as STAGES

# What a comparison of the eval reports must share to mean anything: the same model file type and the same yardstick.
MUST_MATCH = ("quant_type", "primary_metric")
EVAL_SETTINGS = ("primary_metric", "quant_type", "max_tokens", "seed", "n_prompts")


@dataclass
class RunSummary:
    path: Path
    recipe: str
    stages: dict[str, dict]                  # stage -> {"status", "seconds"}
    config: dict[str, str]                   # axolotl.yml flattened to dotted keys, values as YAML text
    losses: list[tuple[int, float]]
    eval: dict | None                        # eval/report.json, when the eval stage has run

    @property
    def primary(self) -> tuple[str, float | None, float | None] | None:
        """(primary metric, the tuned model's value, the best baseline's), when evaluated."""
        if not self.eval:
            return None
        pm = self.eval["primary_metric"]
        best = self.eval.get("best_baseline", "base")
        return pm, self.eval.get("tuned", {}).get(pm), self.eval.get(best, {}).get(pm)


def _flatten(value, prefix: str = "") -> dict[str, str]:
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else str(value)}


def load_run(path: Path) -> RunSummary:
    path = Path(path)
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        raise TutorWrapError(f"{path} is not a run dir: it has no manifest.json",
                             hint="pass a folder that `python -m tutor_wrap run` wrote (runs/<recipe name>/ by default; "
                                  "`python -m tutor_wrap runs` lists them)")
    try:
        manifest = json.loads(manifest_file.read_text("utf-8"))
    except ValueError as exc:
        raise TutorWrapError(f"{manifest_file}: not valid JSON ({exc})", hint="run the recipe again to rewrite it")
    stages = {name: {"status": (manifest.get("stages", {}).get(name) or {}).get("status", "not run"),
                     "seconds": (manifest.get("stages", {}).get(name) or {}).get("seconds")} for name in STAGES}
    config: dict[str, str] = {}
    if (path / "axolotl.yml").is_file():
        config = _flatten(yaml.safe_load((path / "axolotl.yml").read_text("utf-8")) or {})
    report = None
    if stages["eval"]["status"] == "done" and (path / "eval" / "report.json").is_file():
        report = json.loads((path / "eval" / "report.json").read_text("utf-8"))
    return RunSummary(path, str(manifest.get("recipe") or path.name), stages, config,
                      loss_points(read_metrics(path / "train" / "metrics.jsonl")), report)


def summary_row(r: RunSummary) -> dict:
    return {"path": str(r.path), "recipe": r.recipe, "stages": r.stages, "primary": list(r.primary) if r.primary else None}


def find_runs(root: Path) -> list[RunSummary]:
    root = Path(root)
    if not root.is_dir():
        raise TutorWrapError(f"{root}: no such folder", hint="pass the folder your run dirs are in (runs/ by default)")
    return [load_run(d) for d in sorted(root.iterdir()) if (d / "manifest.json").is_file()]


@dataclass
class Comparison:
    runs: list[RunSummary]
    differences: list[tuple[str, list[str]]]          # (key, its value in each run) where they differ
    paired: list[dict] = field(default_factory=list)  # runs[0] against each other run
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"runs": [{"path": str(r.path), "recipe": r.recipe, "stages": r.stages,
                          "eval": {arm: r.eval.get(arm) for arm in r.eval.get("arms", [])} if r.eval else None,
                          "primary": list(r.primary) if r.primary else None} for r in self.runs],
                "differences": [{"key": k, "values": v} for k, v in self.differences],
                "paired": self.paired, "notes": self.notes}


def _answers(report: dict) -> dict[str, dict]:
    """The tuned model's answer per held-out prompt, keyed by the prompt as the eval saw it."""
    out = {}
    for row in report.get("prompts", []):
        key = row.get("instruction")
        if key is None:
            key = json.dumps({k: v for k, v in row.items() if k not in report.get("arms", [])}, sort_keys=True)
        out[str(key)] = row["tuned"]
    return out


def _judged(answer: dict) -> Judged:
    return Judged(answer["text"], answer["eos"], answer["runaway"], answer.get("checks", {}), answer.get("words", 0),
                  answer.get("details", {}))


def _paired(a: RunSummary, b: RunSummary) -> dict:
    for key in MUST_MATCH:
        if a.eval.get(key) != b.eval.get(key):
            raise TutorWrapError(
                f"compare: {a.path} and {b.path} were evaluated with a different {key} ({a.eval.get(key)} and "
                f"{b.eval.get(key)}): their answers are not comparable prompt by prompt",
                hint=f"set eval's {key} alike in both recipes and run each again with `--from eval`"
                     if key == "primary_metric" else "export the same quant type in both (export.quant_types) and "
                                                     "evaluate it (eval.quant_type)")
    pm = a.eval["primary_metric"]
    if not pm.endswith("_rate"):
        return {"a": str(a.path), "b": str(b.path), "metric": pm, "skipped":
                f"{pm} is not a pass/fail rate per prompt: its values are compared, not paired"}
    ours, theirs = _answers(a.eval), _answers(b.eval)
    shared = [k for k in ours if k in theirs]
    if not shared:
        raise TutorWrapError(f"compare: {a.path} and {b.path} share no held-out prompt: nothing to pair",
                             hint="evaluate both on the same prompts file (eval.prompts) and run each again with "
                                  "`--from eval`")
    result = paired([_judged(ours[k]).passes(pm) for k in shared], [_judged(theirs[k]).passes(pm) for k in shared])
    return {"a": str(a.path), "b": str(b.path), "metric": pm, "shared_prompts": len(shared),
            "only_a": len(ours) - len(shared), "only_b": len(theirs) - len(shared), **result}


def compare(paths: list[Path]) -> Comparison:
    if len(paths) < 2:
        raise TutorWrapError("compare: give two or more run dirs", hint="python -m tutor_wrap compare runs/a runs/b")
    if len({Path(p).resolve() for p in paths}) < len(paths):
        raise TutorWrapError("compare: the same run dir is named twice", hint="name each run once")
    runs = [load_run(p) for p in paths]
    keys = sorted(set().union(*(r.config for r in runs)))
    differences = [(k, [r.config.get(k, "(not set)") for r in runs]) for k in keys
                   if len({r.config.get(k, "(not set)") for r in runs}) > 1]
    for s in EVAL_SETTINGS:
        values = [str(r.eval.get(s)) if r.eval else "(no eval)" for r in runs]
        if len(set(values)) > 1:
            differences.append((f"eval.{s}", values))
    comp = Comparison(runs, differences)
    for r in runs:
        if not r.eval:
            comp.notes.append(f"{r.path} has no eval report yet (its eval stage: {r.stages['eval']['status']}): "
                              "no metrics or paired test for it")
    first = runs[0]
    for other in runs[1:]:
        if first.eval and other.eval:
            comp.paired.append(_paired(first, other))
    return comp


def write_report(comp: Comparison, out_dir: Path) -> dict[str, Path]:
    """compare.json, loss.png (every run's curve) and compare.html in `out_dir`; each written whole or not at all."""
    from tutor_wrap.runtime.compare_report import render_html

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "compare.json", "html": out_dir / "compare.html"}
    atomic.write_json(files["json"], comp.to_dict())
    png = out_dir / "loss.png"
    if _plot_losses(comp.runs, png):
        files["png"] = png
    atomic.write_text(files["html"], render_html(comp.to_dict(), files.get("png")))
    return files


def _plot_losses(runs: list[RunSummary], path: Path) -> bool:
    curves = [(r, r.losses) for r in runs if r.losses]
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")   # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    for r, pts in curves:
        ax.plot([s for s, _ in pts], [l for _, l in pts], label=f"{r.recipe} ({r.path.name})", linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return True
