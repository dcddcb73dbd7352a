"""Command line: each subcommand parses its arguments and calls one library function.

Heavy modules (torch, axolotl, transformers) are imported inside the commands that need them, never at import
time, so `--help`, `plan` and `preflight` answer fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tutor_wrap.errors import TutorWrapError

STAGES = ("plan", "train", "merge", "export", "deploy", "eval")


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def cmd_run(args) -> int:
    from tutor_wrap.pipeline import run_pipeline
    from tutor_wrap.recipe import load_recipe
    from tutor_wrap.report import print_summary

    recipe = load_recipe(args.recipe)
    console = _console()
    manifest = run_pipeline(recipe, args.run_dir, from_stage=args.from_stage, until=args.until, console=console)
    from tutor_wrap.pipeline import default_run_dir

    print_summary(manifest, (args.run_dir or default_run_dir(recipe)).resolve(), console)
    return 0


def cmd_plan(args) -> int:
    from tutor_wrap import atomic, axolotl_config
    from tutor_wrap.hardware import probe
    from tutor_wrap.planner import make_plan
    from tutor_wrap.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    hw = probe()
    plan = make_plan(recipe, hw)
    model_dir = recipe.base_model_path()
    cfg = axolotl_config.render(recipe, plan, base_model=str(model_dir or recipe.base_model),
                                dataset_path=recipe.resolve(recipe.dataset.path),
                                run_dir=Path(args.run_dir or Path("runs") / recipe.name).resolve())
    if args.json:
        print(json.dumps({"plan": plan.to_dict(), "axolotl": cfg}, indent=2, default=str))
    else:
        from rich.table import Table

        console = _console()
        table = Table(title=f"plan for {recipe.name}")
        for col in ("knob", "value", "why"):
            table.add_column(col)
        for c in plan.choices:
            table.add_row(c.knob, str(c.value), c.reason)
        console.print(table)
    if args.out:
        if not args.no_validate:
            axolotl_config.validate(cfg, source=str(recipe.source))
        atomic.write_text(Path(args.out), axolotl_config.to_yaml(cfg))
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_merge(args) -> int:
    import yaml

    from tutor_wrap.hardware import probe
    from tutor_wrap.stages.merge import merge

    out = Path(args.out).resolve()
    cfg_path = Path(args.adapter) / "axolotl.yml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else {}
    cfg.setdefault("base_model", str(Path(args.base).resolve()))
    cfg.setdefault("adapter", "lora")
    report = merge(Path(args.base).resolve(), Path(args.adapter).resolve(), out, cfg, probe(out.parent),
                   method=args.method, log=out.parent / f"{out.name}.merge.log")
    print(json.dumps(report, indent=2) if args.json else
          f"merged into {out} ({report['method']}, peak RSS {report['measured_peak_rss_bytes'] / 2**30:.2f} GiB)")
    return 0


def _recipe_of_run(run_dir: Path):
    from tutor_wrap.recipe import load_recipe
    from tutor_wrap.rundir import RunDir

    run = RunDir(Path(run_dir).resolve())
    path = run.manifest().get("recipe_path")
    if not path:
        raise TutorWrapError(f"{run.path}: no manifest.json with a recipe", hint="pass a run directory made by `run`")
    return run, load_recipe(path)


def cmd_deploy(args) -> int:
    from tutor_wrap.hardware import probe
    from tutor_wrap.stages import Context, deploy

    run, recipe = _recipe_of_run(args.run_dir)
    if args.name:
        recipe = recipe.model_copy(update={"ollama": recipe.ollama.model_copy(update={"model": args.name})})
    res = deploy.run(Context(recipe, run, probe(run.path), _console()))
    print(json.dumps(res.info))
    return 0


def cmd_eval(args) -> int:
    from tutor_wrap.hardware import probe
    from tutor_wrap.stages import Context, evaluate

    run, recipe = _recipe_of_run(args.run_dir)
    evaluate.run(Context(recipe, run, probe(run.path), _console()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tutor_wrap", description="Fine-tune with Axolotl, merge, export to GGUF, "
                                "deploy to Ollama and compare with the base: one recipe, one command.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run every stage of a recipe (resumes where it stopped)")
    r.add_argument("recipe", type=Path)
    r.add_argument("--run-dir", type=Path, default=None, help="default: runs/<recipe name>/")
    r.add_argument("--from", dest="from_stage", choices=STAGES, help="redo this stage and everything after it")
    r.add_argument("--until", choices=STAGES, help="stop after this stage (run again without it to go on)")
    r.set_defaults(func=cmd_run)

    pl = sub.add_parser("plan", help="show the planned knobs and write the Axolotl YAML")
    pl.add_argument("recipe", type=Path)
    pl.add_argument("--out", type=Path, help="write the Axolotl YAML here (validated by Axolotl's schema)")
    pl.add_argument("--run-dir", type=Path, default=None)
    pl.add_argument("--no-validate", action="store_true", help="skip Axolotl's schema check (it takes ~10 s)")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)

    m = sub.add_parser("merge", help="merge a LoRA adapter into its base model, checking RAM and disk first")
    m.add_argument("--base", required=True)
    m.add_argument("--adapter", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--method", choices=("auto", "memory_efficient", "legacy"), default="auto")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_merge)

    d = sub.add_parser("deploy", help="write the Modelfile for a run and create the Ollama model")
    d.add_argument("run_dir", type=Path)
    d.add_argument("--name", help="Ollama model name (default: the recipe's ollama.model)")
    d.set_defaults(func=cmd_deploy)

    e = sub.add_parser("eval", help="compare base and fine-tuned GGUFs on the recipe's held-out prompts")
    e.add_argument("run_dir", type=Path)
    e.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except TutorWrapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; `run` again to resume from the last completed stage or checkpoint", file=sys.stderr)
        return 130
