"""Runs side by side: `runs` lists what a folder of run dirs holds, `compare` sets two or more runs against the
first one: what differs in what the trainer and the eval got, the loss curves on one plot, the eval metrics per
arm, and between the fine-tuned models on the held-out prompts they share the paired test the eval itself uses
(checks/stats.paired: wins, losses, ties, exact McNemar p) on the primary metric.

Everything is read from the run dirs (manifest.json, axolotl.yml, plan.json, train/metrics.jsonl,
eval/report.json): a run is compared as it was run, whatever its recipe file says now.
"""

from __future__ import annotations

import io
import json
import math
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
    notes: list[str] = field(default_factory=list)   # what of the run could not be read, and what that leaves out

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


def _json(path: Path, what: str) -> object:
    try:
        return json.loads(path.read_text("utf-8"))
    except ValueError as exc:
        raise TutorWrapError(f"{path}: not valid JSON ({exc})", hint=f"{what}") from None


def _eval_report(path: Path, redo: str) -> tuple[dict | None, str | None]:
    """The run's eval report, or (None, why it is not usable)."""
    f = path / "eval" / "report.json"
    if not f.is_file():
        return None, f"its eval stage is recorded as done, but {f} is missing: {redo}"
    report = _json(f, redo)
    arms = report.get("arms") if isinstance(report, dict) else None
    prompts = report.get("prompts") if isinstance(report, dict) else None
    if not (isinstance(arms, list) and "tuned" in arms and isinstance(report.get("primary_metric"), str)
            and all(isinstance(report.get(a), dict) for a in arms) and isinstance(prompts, list)
            and all(isinstance(row, dict) and isinstance(row.get("tuned"), dict) for row in prompts)):
        raise TutorWrapError(f"{f}: not an eval report tutor_wrap wrote (it needs primary_metric, arms with tuned, "
                             "each arm's metrics and each prompt's tuned answer)", hint=redo)
    return report, None


def load_run(path: Path) -> RunSummary:
    """A run dir read back; a file of it that is not what `run` writes is one TutorWrapError naming the file."""
    path = Path(path)
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        raise TutorWrapError(f"{path} is not a run dir: it has no manifest.json",
                             hint="pass a folder that `python -m tutor_wrap run` wrote (runs/<recipe name>/ by default; "
                                  "`python -m tutor_wrap runs` lists them)")
    redo = "run the recipe again (`python -m tutor_wrap run RECIPE --run-dir " + str(path) + "`) to rewrite it"
    manifest = _json(manifest_file, redo)
    recorded = manifest.get("stages") if isinstance(manifest, dict) else None
    if not isinstance(recorded, dict) or not all(isinstance(v, dict) for v in recorded.values()):
        raise TutorWrapError(f"{manifest_file}: not a manifest tutor_wrap wrote (no `stages` record per stage)",
                             hint=redo)
    stages = {}
    for name in STAGES:
        rec = recorded.get(name) or {}
        seconds = rec.get("seconds")
        stages[name] = {"status": str(rec.get("status", "not run")),
                        "seconds": seconds if isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
                        else None}
    notes = []
    config: dict[str, str] = {}
    yml = path / "axolotl.yml"
    if yml.is_file():
        try:
            loaded = yaml.safe_load(yml.read_text("utf-8"))
        except yaml.YAMLError as exc:
            raise TutorWrapError(f"{yml}: not valid YAML ({str(exc).splitlines()[0]})", hint=redo) from None
        config = _flatten(loaded) if isinstance(loaded, dict) else {}
    else:
        notes.append(f"{yml} is missing: the trainer's config of this run is not compared")
    report = None
    if stages["eval"]["status"] == "done":
        report, why = _eval_report(path, f"redo its eval: `python -m tutor_wrap run RECIPE --run-dir {path} "
                                         "--from eval`")
        if why:
            notes.append(why)
    losses = loss_points(read_metrics(path / "train" / "metrics.jsonl"))
    if stages["train"]["status"] == "done" and not losses:
        notes.append(f"{path / 'train' / 'metrics.jsonl'} has no loss: this run has no curve on the plot")
    elif not losses:
        notes.append(f"{path} has not finished training (its train stage: {stages['train']['status']}): this run has "
                     "no curve on the plot")
    recipe = manifest.get("recipe")
    return RunSummary(path, str(recipe) if isinstance(recipe, str) and recipe else path.name, stages, config, losses,
                      report, notes)


def summary_row(r: RunSummary, root: Path | None = None) -> dict:
    shown = r.path
    if root is not None:
        try:
            shown = r.path.relative_to(root)
        except ValueError:
            pass
    return {"path": str(shown), "recipe": r.recipe, "stages": r.stages,
            "primary": list(r.primary) if r.primary else None, "notes": r.notes}


def find_runs(root: Path) -> list[dict]:
    """A row per run dir in `root` (or `root` itself when it is one); a run dir that cannot be read is a row saying
    why, not the end of the listing."""
    root = Path(root)
    if (root / "manifest.json").is_file():
        dirs = [root]
    elif root.is_dir():
        seen: set[Path] = set()
        dirs = []
        for d in sorted(root.iterdir()):
            if (d / "manifest.json").is_file() and d.resolve() not in seen:   # a symlinked run is listed once
                seen.add(d.resolve())
                dirs.append(d)
    else:
        raise TutorWrapError(f"{root}: no such folder" if not root.exists() else f"{root}: not a folder",
                             hint="pass the folder your run dirs are in (runs/ by default)")
    rows = []
    for d in dirs:
        try:
            rows.append(summary_row(load_run(d), root if d != root else root.parent))
        except TutorWrapError as exc:
            rows.append({"path": str(d), "recipe": "?", "stages": None, "primary": None,
                         "notes": ["unreadable: " + str(exc).replace("\n  fix: ", "; fix: ")]})
    return rows


@dataclass
class Comparison:
    runs: list[RunSummary]
    differences: list[tuple[str, list[str]]]          # (key, its value in each run) where they differ
    paired: list[dict] = field(default_factory=list)  # runs[0] against each other run
    notes: list[str] = field(default_factory=list)

    def labels(self) -> list[str]:
        """A name per run for columns and the plot: the recipe and the run dir's name, or its whole path where two
        run dirs have the same name."""
        names = [r.path.resolve().name for r in self.runs]
        return [f"{r.recipe} ({r.path.name if names.count(n) == 1 else r.path})" for r, n in zip(self.runs, names)]

    def to_dict(self) -> dict:
        return {"runs": [{"path": str(r.path), "recipe": r.recipe, "stages": r.stages, "label": label,
                          "eval": {arm: r.eval.get(arm) for arm in r.eval.get("arms", [])} if r.eval else None,
                          "primary": list(r.primary) if r.primary else None}
                         for r, label in zip(self.runs, self.labels())],
                "differences": [{"key": k, "values": v} for k, v in self.differences],
                "paired": self.paired, "notes": self.notes}


# Rate metrics every answer has a verdict for; any other `<check>_rate` is measured only where the check ran.
_ALWAYS_MEASURED = ("format_pass_rate", "all_checks_rate", "eos_rate", "no_runaway_rate")


def _answers(report: dict) -> dict[str, dict]:
    """The tuned model's answer per held-out prompt, keyed by the prompt as the eval saw it (every field of its row
    but the answers; a prompt that occurs twice is told apart by its occurrence)."""
    out: dict[str, dict] = {}
    arms = set(report.get("arms", []))
    for row in report["prompts"]:
        key = json.dumps({k: v for k, v in row.items() if k not in arms and k != "overlaps_training"}, sort_keys=True)
        n = 1
        while f"{key}#{n}" in out:
            n += 1
        out[f"{key}#{n}"] = row["tuned"]
    return out


def _judged(answer: dict) -> Judged:
    return Judged(str(answer.get("text", "")), bool(answer.get("eos")), bool(answer.get("runaway")),
                  dict(answer.get("checks") or {}), int(answer.get("words") or 0), dict(answer.get("details") or {}))


def _paired(a: RunSummary, b: RunSummary) -> dict:
    for key in MUST_MATCH:
        va, vb = a.eval.get(key), b.eval.get(key)
        if va is None or vb is None:
            missing = a if va is None else b
            raise TutorWrapError(f"compare: {missing.path / 'eval' / 'report.json'} does not say its {key}",
                                 hint=f"redo its eval: `python -m tutor_wrap run RECIPE --run-dir {missing.path} "
                                      "--from eval`")
        if va != vb:
            raise TutorWrapError(
                f"compare: {a.path} and {b.path} were evaluated with a different {key} ({va} and {vb}): their "
                "answers are not comparable prompt by prompt",
                hint=f"set eval's {key} alike in both recipes and run each again with `--from eval`"
                     if key == "primary_metric" else "export the same quant type in both (export.quant_types) and "
                                                     "evaluate it (eval.quant_type)")
    pm = a.eval["primary_metric"]
    base = {"a": str(a.path), "b": str(b.path), "metric": pm}
    if not pm.endswith("_rate"):
        return {**base, "skipped": f"{pm} is not a pass/fail rate per prompt: its values are compared, not paired"}
    ours, theirs = _answers(a.eval), _answers(b.eval)
    shared = [k for k in ours if k in theirs]
    if not shared:
        raise TutorWrapError(f"compare: {a.path} and {b.path} share no held-out prompt: nothing to pair",
                             hint="evaluate both on the same prompts file (eval.prompts) and run each again with "
                                  "`--from eval`")
    check = pm.removesuffix("_rate")
    if pm not in _ALWAYS_MEASURED:
        for run, answers in ((a, ours), (b, theirs)):
            if not any(check in (answers[k].get("checks") or {}) for k in shared):
                return {**base, "skipped": f"{pm}: no answer of {run.path} carries a {check} verdict (the check "
                                           "did not run there), so there is nothing to pair"}
    result = paired([_judged(ours[k]).passes(pm) for k in shared], [_judged(theirs[k]).passes(pm) for k in shared])
    return {**base, "shared_prompts": len(shared), "only_a": len(ours) - len(shared),
            "only_b": len(theirs) - len(shared), **result}


def compare(paths: list[Path]) -> Comparison:
    if len(paths) < 2:
        raise TutorWrapError("compare: give two or more run dirs", hint="python -m tutor_wrap compare runs/a runs/b")
    seen: dict[Path, Path] = {}
    for p in paths:
        if Path(p).resolve() in seen:
            raise TutorWrapError(f"compare: {p} is the same run dir as {seen[Path(p).resolve()]}",
                                 hint="name each run once")
        seen[Path(p).resolve()] = Path(p)
    runs = [load_run(p) for p in paths]
    keys = sorted(set().union(*(r.config for r in runs)))
    differences = [(k, [r.config.get(k, "(not set)") for r in runs]) for k in keys
                   if len({r.config.get(k, "(not set)") for r in runs}) > 1]
    for s in EVAL_SETTINGS:
        values = [str(r.eval.get(s)) if r.eval else "(no eval)" for r in runs]
        if len(set(values)) > 1:
            differences.append((f"eval.{s}", values))
    comp = Comparison(runs, differences, notes=[n for r in runs for n in r.notes])
    for r in runs:
        if not r.eval and r.stages["eval"]["status"] != "done":
            comp.notes.append(f"{r.path} has no eval report yet (its eval stage: {r.stages['eval']['status']}): "
                              "no metrics or paired test for it")
    first = runs[0]
    for other in runs[1:]:
        if first.eval and other.eval:
            comp.paired.append(_paired(first, other))
    return comp


def default_out(comp: Comparison) -> Path:
    """compare-A-vs-B beside the first run (its real folder, wherever the command was started)."""
    real = [r.path.resolve() for r in comp.runs]
    names = [p.name for p in real]
    if len(set(names)) < len(names):
        names = [f"{n}{i + 1}" for i, n in enumerate(names)]
    return real[0].parent / ("compare-" + "-vs-".join(names))


def check_out(comp: Comparison, out: Path) -> None:
    """The page goes beside the runs, never into one (it would overwrite or scatter files a stage recorded)."""
    target = out.resolve()
    for r in comp.runs:
        home = r.path.resolve()
        if target == home or home in target.parents:
            raise TutorWrapError(f"compare: --out {out} is inside the run dir {r.path}: compare writes beside the runs, "
                                 "not into one (it would overwrite what a stage recorded)",
                                 hint=f"choose a folder outside it, or leave --out out ({default_out(comp)})")
    if out.exists() and not out.is_dir():
        raise TutorWrapError(f"compare: --out {out} is a file, not a folder", hint="name a folder (it is created)")


def write_report(comp: Comparison, out_dir: Path) -> dict[str, Path]:
    """compare.json, loss.png (every run's curve) and compare.html in `out_dir`; each written whole or not at all."""
    from tutor_wrap.runtime.compare_report import render_html

    check_out(comp, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"json": out_dir / "compare.json", "html": out_dir / "compare.html"}
    atomic.write_json(files["json"], comp.to_dict())
    png = out_dir / "loss.png"
    if _plot_losses(comp.runs, comp.labels(), png):
        files["png"] = png
    atomic.write_text(files["html"], render_html(comp.to_dict(), files.get("png")))
    return files


def _plot_losses(runs: list[RunSummary], labels: list[str], path: Path) -> bool:
    curves = [(label, [(s, l) for s, l in r.losses if math.isfinite(l)]) for r, label in zip(runs, labels)]
    curves = [(label, pts) for label, pts in curves if pts]
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")   # no display on servers and CI
    import matplotlib.pyplot as plt

    import warnings

    warnings.filterwarnings("ignore", message="Glyph .* missing from", category=UserWarning)  # emoji in run names
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    for label, pts in curves:
        ax.plot([s for s, _ in pts], [l for _, l in pts], label=label, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())
    return True
