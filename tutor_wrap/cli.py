"""Command line: each subcommand parses its arguments and calls one library function.

Heavy modules (torch, axolotl, transformers) are imported inside the commands that need them, never at import
time, so `--help`, `plan` and `preflight` answer fast.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from tutor_wrap.core.errors import TutorWrapError
from tutor_wrap.stages import NAMES as STAGES   # the stage list itself, without importing a stage


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def cmd_run(args) -> int:
    from tutor_wrap.pipeline import run_pipeline
    from tutor_wrap.recipe.load import load_recipe
    from tutor_wrap.runtime.report import print_summary

    recipe = load_recipe(args.recipe)
    console = _console()
    machines = None
    if args.num_machines > 1:
        machines = {"num_machines": args.num_machines, "machine_rank": args.machine_rank,
                    "main_process_ip": args.main_process_ip, "main_process_port": args.main_process_port}
    manifest = run_pipeline(recipe, args.run_dir, from_stage=args.from_stage, until=args.until, machines=machines,
                            console=console, processes=args.num_processes)
    print_summary(manifest, (args.run_dir or recipe.default_run_dir()).resolve(), console)
    return 0


def cmd_fetch(args) -> int:
    from tutor_wrap.pipeline import fetch
    from tutor_wrap.recipe.load import load_recipe

    recipe = load_recipe(args.recipe)
    sources = fetch(recipe, args.run_dir, _console())
    if not sources:
        print(f"{args.recipe} names no hub model or dataset: nothing to fetch", file=sys.stderr)
    for key, s in sources.items():
        print(f"{key}: {s['repo']} at {s['commit']}" + (f" ({s['revision']})" if s["revision"] != s["commit"] else ""))
    return 0


def cmd_calibration(args) -> int:
    from rich.markup import escape
    from rich.table import Table

    from tutor_wrap.machine.profiles import resolve_hardware
    from tutor_wrap.planning import calibration

    damaged = calibration.problem()
    if args.reset:
        if damaged and calibration.store_path().is_dir():
            raise TutorWrapError(damaged, hint="remove it or point TUTOR_WRAP_CALIBRATION at a file")
        n = calibration.reset()
        print(json.dumps({"store": str(calibration.store_path()), "forgot": n, "was_damaged": damaged}) if args.json
              else f"forgot {n} measurements ({calibration.store_path()})"
              + (f"; it was damaged ({damaged}) and is now an empty store" if damaged else ""))
        return 0
    if damaged:
        raise TutorWrapError(f"the calibration store is damaged: {damaged}; plans use only its valid records",
                             hint="`python -m tutor_wrap calibration --reset` replaces it with an empty store")
    hw = resolve_hardware("auto")
    mine = calibration.records(hw)
    if args.json:
        print(json.dumps({"store": str(calibration.store_path()), "machine": calibration.machine_key(hw),
                          "records": mine}, indent=2))
        return 0
    table = Table(title=f"measured on this machine ({len(mine)}; {calibration.store_path()})")
    for col in ("when", "what", "run", "predicted", "measured", "off"):
        table.add_column(col)
    for r in mine:
        off = calibration.off_by(r["predicted_bytes"], r["measured_bytes"])
        what = " ".join(str(r[k]) for k in ("kind", "method", "dtype") if r.get(k))
        if r.get("batch_tokens"):
            what += f", {r['batch_tokens']} tokens"
        table.add_row(escape(str(r.get("time", "?"))), escape(what), escape(r["run"]),
                      f"{r['predicted_bytes'] / 2**30:.2f} GiB", f"{r['measured_bytes'] / 2**30:.2f} GiB",
                      f"{off:+.0f}%" if off is not None else "-")
    _console().print(table)
    return 0


def cmd_runs(args) -> int:
    from tutor_wrap.compare import find_runs
    from tutor_wrap.runtime.compare_report import runs_table

    from rich.markup import escape

    rows = find_runs(args.dir)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no run dirs in {args.dir} (a run dir holds the manifest.json that `run` writes)")
    else:
        _console().print(runs_table(rows, STAGES, title=f"runs in {escape(str(args.dir))}"))
    return 0


def cmd_compare(args) -> int:
    from tutor_wrap.compare import compare, default_out, write_report
    from tutor_wrap.runtime.compare_report import tables

    comp = compare(args.runs)
    files = write_report(comp, args.out or default_out(comp))
    if args.json:
        print(json.dumps({**comp.to_dict(), "files": {k: str(v) for k, v in files.items()}}, indent=2))
        return 0
    console = _console()
    for t in tables(comp.to_dict()):
        console.print(t)
    from rich.markup import escape

    console.print(f"page: {escape(str(files['html']))}")
    return 0


def cmd_plan(args) -> int:
    from rich.markup import escape

    from tutor_wrap.backends import tracking
    from tutor_wrap.machine.profiles import resolve_hardware
    from tutor_wrap.pipeline import plan_for
    from tutor_wrap.recipe.load import load_recipe
    from tutor_wrap.runtime.tables import memory_table, plan_table
    from tutor_wrap.stages import plan as plan_stage

    recipe = load_recipe(args.recipe)
    hw = resolve_hardware(args.hardware or recipe.hardware)
    p, _ = plan_for(recipe, hw, args.run_dir, processes=args.num_processes)
    plan = p.plan
    trackers = tracking.describe(recipe, args.run_dir or recipe.default_run_dir())
    if args.json:
        print(json.dumps({"hardware": hw.source, "plan": plan.to_dict(), "axolotl": p.config, "tracking": trackers},
                         indent=2, default=str))
    else:
        console = _console()
        console.print(plan_table(plan, f"plan for {recipe.name} on {hw.source}"))
        if plan.memory:
            console.print(memory_table(plan.memory, plan.budget_gib))
        for name, where in trackers.items():
            console.print(f"tracking: {name}: {escape(where)}")
    for note in p.notes:
        print(f"warning: {note}", file=sys.stderr)
    if args.out:
        if not args.no_validate:
            plan_stage.validate(recipe, p.config)
        plan_stage.write_config(p.config, Path(args.out))
        print(f"wrote {args.out}" + ("" if args.no_validate else " (validated by Axolotl's schema)"), file=sys.stderr)
    if plan.verdict == "impractical":
        print(f"error: training {recipe.name} here is impractical: ~{plan.seconds_per_step:.0f} s per step on "
              f"{hw.source}", file=sys.stderr)
        return 1
    return 0


def cmd_estimate(args) -> int:
    from tutor_wrap.models.catalog import lookup
    from tutor_wrap.planning.memory import Knobs, estimate
    from tutor_wrap.runtime.tables import memory_table

    short = {"q", "k", "v", "o", "gate", "up", "down"}   # q,v is q_proj,v_proj; other names are taken as written
    targets = args.lora_targets if args.lora_targets == "all-linear" else tuple(
        f"{t}_proj" if t in short else t for t in (t.strip() for t in args.lora_targets.split(",")) if t)
    knobs = Knobs(method=args.method, lora_r=args.lora_r, lora_targets=targets, seq_len=args.seq_len,
                  micro_batch=args.micro_batch, grad_ckpt=args.grad_ckpt == "on", optimizer=args.optimizer,
                  attn=args.attn, packing=args.packing == "on", loss=args.loss, dtype=args.dtype)
    br = estimate(lookup(args.model), knobs)
    doc = {"model": args.model, "knobs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in knobs.__dict__.items()},
           **br.to_gib_dict()}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        _console().print(memory_table(br.to_gib_dict(), None))
    return 0


def cmd_preflight(args) -> int:
    from tutor_wrap.machine.profiles import resolve_hardware, save_profile
    from tutor_wrap.pipeline import preflight
    from tutor_wrap.runtime.tables import preflight_tables

    recipe = None
    if args.recipe:
        from tutor_wrap.recipe.load import load_recipe

        recipe = load_recipe(args.recipe)
    hw = resolve_hardware(args.hardware or (recipe.hardware if recipe else None), args.run_dir)
    if args.save_profile:
        save_profile(hw, args.save_profile)
        print(f"wrote {args.save_profile}", file=sys.stderr)
    report = preflight(recipe, hw, args.run_dir, processes=args.num_processes)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        console = _console()
        for table in preflight_tables(report):
            console.print(table)
        for note in report.get("input_notes") or []:
            print(f"warning: {note}", file=sys.stderr)
        if not report.get("ok", True):
            console.print("[bold red]preflight found errors: fix them before `run`[/]")
    return 0 if report["ok"] else 1


def cmd_merge(args) -> int:
    from tutor_wrap.machine.profiles import resolve_hardware
    from tutor_wrap.pipeline import merge_folder

    out = Path(args.out).resolve()
    hw = resolve_hardware(args.hardware, out.parent)
    report = merge_folder(Path(args.base).resolve(), Path(args.adapter).resolve(), out, hw, method=args.method,
                          verify=not args.no_verify)
    print(json.dumps(report.to_dict(), indent=2) if args.json else
          f"merged into {out} ({report.method}, peak RSS {report.measured_peak_rss_bytes / 2**30:.2f} GiB, "
          f"verification {(report.verification or {}).get('status', 'off')})")
    return 0


def cmd_deploy(args) -> int:
    from tutor_wrap.pipeline import run_stage_of

    res = run_stage_of(args.run_dir, "deploy", _console(), ollama_name=args.name)
    print(json.dumps(res.info))
    return 0


def cmd_eval(args) -> int:
    from tutor_wrap.pipeline import run_stage_of

    run_stage_of(args.run_dir, "eval", _console())
    return 0


def _path(text: str) -> Path:
    """A path argument: an empty one (`--run-dir ''`, an unset shell variable) would mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (is a shell variable unset?)")
    return Path(text)


def _host(text: str) -> str:
    """--main-process-ip: an address or a host name, nothing a launcher would read as more."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.:-]*", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address or host name")
    return text


def _name(text: str) -> str:
    """An Ollama model name, by Ollama's own rules (recipe/schema.ollama_name_problem)."""
    from tutor_wrap.recipe.schema import ollama_name_problem

    if not text.strip():
        raise argparse.ArgumentTypeError("an empty name")
    problem = ollama_name_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


def _count(lowest: int, highest: int | None = None):
    """A whole number in range, as argparse checks it (exit 2, like every other bad argument)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if n < lowest or (highest is not None and n > highest):
            raise argparse.ArgumentTypeError(f"{n}: {lowest} to {highest}" if highest is not None
                                             else f"{n}: at least {lowest}")
        return n
    return parse


def _processes_arg(parser) -> None:
    # On plan, preflight and run alike: the plan (batch split, threads per process) depends on it.
    parser.add_argument("--num-processes", type=_count(1), default=None, metavar="N",
                        help="training processes on this machine (default: one per GPU, or one on a CPU); on a CPU, "
                             "N processes split the rows and average gradients over gloo")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tutor_wrap", description="Fine-tune with Axolotl, merge, export to GGUF, "
                                "deploy to Ollama and compare with the base: one recipe, one command.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run every stage of a recipe (resumes where it stopped)")
    r.add_argument("recipe", type=_path)
    r.add_argument("--run-dir", type=_path, default=None, help="default: runs/<recipe name>/")
    r.add_argument("--from", dest="from_stage", choices=STAGES, help="redo this stage and everything after it")
    r.add_argument("--until", choices=STAGES, help="stop after this stage (run again without it to go on)")
    _processes_arg(r)
    _offline_arg(r)
    mm = r.add_argument_group("several machines (run the same command on each, with its own --machine-rank)")
    mm.add_argument("--num-machines", type=int, default=1)
    mm.add_argument("--machine-rank", type=int, default=0)
    mm.add_argument("--main-process-ip", type=_host)
    mm.add_argument("--main-process-port", type=int, default=29500)
    r.set_defaults(func=cmd_run)

    f = sub.add_parser("fetch", help="download a recipe's hub model and dataset ahead of `run` (only what it reads)")
    f.add_argument("recipe", type=_path)
    f.add_argument("--run-dir", type=_path, default=None, help="default: runs/<recipe name>/")
    _offline_arg(f)
    f.set_defaults(func=cmd_fetch)

    pl = sub.add_parser("plan", help="show the planned knobs and write the Axolotl YAML")
    pl.add_argument("recipe", type=_path)
    pl.add_argument("--out", type=_path, help="write the Axolotl YAML here (validated by Axolotl's schema)")
    pl.add_argument("--run-dir", type=_path, default=None,
                    help="the run dir the plan is for (default: runs/<recipe name>/); trackers' defaults go beside it")
    pl.add_argument("--hardware", help="a profile name or file instead of probing this machine")
    pl.add_argument("--no-validate", action="store_true", help="skip Axolotl's schema check (it takes ~10 s)")
    pl.add_argument("--json", action="store_true")
    _processes_arg(pl)
    pl.set_defaults(func=cmd_plan)

    es = sub.add_parser("estimate", help="predict peak GPU memory of an Axolotl run (no torch import)")
    es.add_argument("--model", required=True, help="catalog id, hub id or a local model folder")
    es.add_argument("--method", choices=("full", "lora", "lora8bit", "qlora"), default="qlora")
    es.add_argument("--lora-r", type=_count(1, 1024), default=16)
    es.add_argument("--lora-targets", default="all-linear", help="all-linear or e.g. q,v")
    es.add_argument("--seq-len", type=_count(16, 131072), default=2048)
    es.add_argument("--micro-batch", type=_count(1), default=1)
    es.add_argument("--grad-ckpt", choices=("on", "off"), default="on")
    es.add_argument("--optimizer", choices=("adamw_torch", "adamw_bnb_8bit", "paged_adamw_8bit", "paged_adamw_32bit"),
                    default="adamw_bnb_8bit")
    es.add_argument("--attn", choices=("eager", "sdpa", "flash"), default="sdpa")
    es.add_argument("--loss", choices=("standard", "cce"), default="standard")
    es.add_argument("--packing", choices=("on", "off"), default="off")
    es.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    es.add_argument("--json", action="store_true")
    es.set_defaults(func=cmd_estimate)

    pf = sub.add_parser("preflight", help="check the machine and software stack (and a recipe's stages) before a run")
    pf.add_argument("recipe", type=_path, nargs="?")
    pf.add_argument("--hardware", help="a profile name or file instead of probing this machine")
    pf.add_argument("--run-dir", type=_path, default=None,
                    help="the run dir to judge (default: runs/<recipe name>/): its finished stages' files count")
    pf.add_argument("--save-profile", type=_path, help="write this machine as a hardware profile")
    pf.add_argument("--json", action="store_true")
    _processes_arg(pf)
    pf.set_defaults(func=cmd_preflight)

    m = sub.add_parser("merge", help="merge a LoRA adapter into its base model, checking RAM and disk first")
    m.add_argument("--base", required=True, type=_path)
    m.add_argument("--adapter", required=True, type=_path)
    m.add_argument("--out", required=True, type=_path, help="a new folder for the merged model (never overwritten)")
    m.add_argument("--method", choices=("auto", "memory_efficient", "legacy"), default="auto")
    m.add_argument("--hardware", help="a profile name or file instead of probing this machine (a refusal writes nothing)")
    m.add_argument("--no-verify", action="store_true", help="skip comparing the merged model with base + adapter")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_merge)

    d = sub.add_parser("deploy", help="write the Modelfile for a run and create the Ollama model")
    d.add_argument("run_dir", type=_path)
    d.add_argument("--name", type=_name, help="Ollama model name (default: the recipe's ollama.model)")
    d.set_defaults(func=cmd_deploy)

    c = sub.add_parser("calibration", help="what this machine's runs measured, which later plans use (show, reset)")
    c.add_argument("--reset", action="store_true", help="forget every measurement")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_calibration)

    rs = sub.add_parser("runs", help="list the run dirs in a folder: recipe, stages done, time, primary metric")
    rs.add_argument("dir", type=_path, nargs="?", default=Path("runs"))
    rs.add_argument("--json", action="store_true")
    rs.set_defaults(func=cmd_runs)

    cp = sub.add_parser("compare", help="two or more runs: what differs, loss curves, eval metrics, and the paired "
                                        "test between their fine-tuned models (against the first run)")
    cp.add_argument("runs", type=_path, nargs="+", metavar="RUN_DIR")
    cp.add_argument("--out", type=_path, default=None,
                    help="where compare.html, compare.json and loss.png go (default: compare-A-vs-B beside the first run)")
    cp.add_argument("--json", action="store_true")
    cp.set_defaults(func=cmd_compare)

    e = sub.add_parser("eval", help="compare base and fine-tuned GGUFs on the recipe's held-out prompts")
    e.add_argument("run_dir", type=_path)
    e.set_defaults(func=cmd_eval)
    return p


def run_args_problem(args) -> str | None:
    """What makes `run`'s flags impossible together (argparse checks each alone): said before anything starts."""
    if args.from_stage and args.until and STAGES.index(args.from_stage) > STAGES.index(args.until):
        return f"--from {args.from_stage} comes after --until {args.until}: nothing would run"
    if args.num_machines < 1:
        return f"--num-machines {args.num_machines}: at least 1"
    if not 0 <= args.machine_rank < args.num_machines:
        return f"--machine-rank {args.machine_rank} with --num-machines {args.num_machines}: 0 to {args.num_machines - 1}"
    if args.num_machines > 1 and not args.main_process_ip:
        return "--num-machines > 1 needs --main-process-ip (the address of the machine with --machine-rank 0)"
    if not 0 < args.main_process_port < 65536:
        return f"--main-process-port {args.main_process_port}: 1 to 65535"
    if args.num_processes is not None and args.num_processes < 1:
        return f"--num-processes {args.num_processes}: at least 1"
    return None


def _offline_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--offline", action="store_true",
                   help="never touch the network: use what the Hugging Face cache has (as HF_HUB_OFFLINE=1)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "offline", False):
        os.environ["HF_HUB_OFFLINE"] = "1"   # before huggingface_hub is imported: it reads this once
    if args.func is cmd_run and (problem := run_args_problem(args)):
        parser.error(problem)   # exit 2, like every other bad argument
    if args.func is cmd_compare and len(args.runs) < 2:
        parser.error("compare needs two or more run dirs (the first is the one the others are set against)")
    try:
        return args.func(args)
    except TutorWrapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # The reader went away (`... --json | head`): stop quietly, as the standard tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        # The file system said no (permissions, a full disk, a read-only mount): one line naming the path, no
        # traceback; each stage's own checks catch what they can foresee before this.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}\n  fix: check that you can write there (permissions, free "
              "space, a read-only mount), or choose another place (--run-dir, --out)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the same command again resumes (finished stages, checkpoints and the downloaded part of a "
              "file are kept)", file=sys.stderr)
        return 130
