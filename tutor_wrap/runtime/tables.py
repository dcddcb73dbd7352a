"""Every table tutor_wrap prints, in one place: the plan, the memory breakdown, preflight, the eval summary.

Text that comes from a user, a file or a probe (names, paths, remedies with `[wsl2]`) is escaped, so Rich prints
it as written instead of reading it as markup.
"""

from __future__ import annotations

from rich.markup import escape as esc
from rich.table import Table

from tutor_wrap.core.units import gib
from tutor_wrap.machine.host import isa_level


def plan_table(plan, title: str = "plan") -> Table:
    table = Table(title=esc(title))
    for col in ("knob", "value", "why"):
        table.add_column(col)
    for c in plan.choices:
        table.add_row(esc(c.knob), esc(str(c.value)), esc(c.reason))
    return table


def memory_table(memory: dict, budget_gib: float | None) -> Table:
    table = Table(title="predicted GPU memory" + (f" (budget {budget_gib:.1f} GiB)" if budget_gib else ""))
    table.add_column("component")
    table.add_column("GiB", justify="right")
    sums = ("allocated_gib", "reserved_gib", "total_gib")
    for k, v in memory.items():
        if isinstance(v, (int, float)) and k not in sums:
            table.add_row(k.removesuffix("_gib"), f"{v:.2f}")
    table.add_row("= allocated (torch max_memory_allocated)", f"{memory['allocated_gib']:.2f}")
    table.add_row("= reserved (torch max_memory_reserved)", f"{memory['reserved_gib']:.2f}")
    table.add_row("[bold]= total: reserved + CUDA context[/]", f"[bold]{memory['total_gib']:.2f}[/]")
    return table


def eval_table(report: dict) -> Table:
    arms = report.get("arms", ["base", "tuned"])
    best = report.get("best_baseline", "base")
    table = Table(title=f"base vs tuned ({report['n_prompts']} prompts, {esc(report['quant_type'])}, temperature 0)")
    for col in ("metric", *(a.replace("_", " ") for a in arms), f"delta vs {best.replace('_', ' ')}"):
        table.add_column(col)
    for k in report["tuned"]:
        vals = [report[a].get(k) for a in arms]
        b, t = report[best].get(k), report["tuned"].get(k)
        mark = " *" if k == report["primary_metric"] else ""
        table.add_row(k + mark, *("-" if v is None else f"{v:.3f}" for v in vals),
                      "-" if b is None or t is None else f"{t - b:+.3f}")
    return table


_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan", "fits": "green", "tight": "yellow",
          "won't fit": "bold red", "unknown": "dim", "n/a": "dim"}


def preflight_tables(report: dict) -> list:
    """The preflight report as tables: machine, software, findings, stages (each text escaped for Rich)."""
    out = []
    hw = report["hardware"]
    t = Table(title="machine", show_header=False)
    t.add_column("what")
    t.add_column("value")
    t.add_row("source", esc(hw["source"]))
    for i, g in enumerate(hw["gpus"]):
        arch = g.get("compute_capability") and f"cc {g['compute_capability']}" or g.get("gfx_target") or ""
        t.add_row(f"GPU {i}", f"{esc(g['name'])}  {gib(g['vram_total_bytes'])} ({gib(g.get('vram_free_bytes'))} free)  "
                  f"{esc(arch)}  bf16={'yes' if g['bf16'] else 'no'}")
    if not hw["gpus"]:
        t.add_row("GPU", "none")
    flags = hw.get("cpu_flags")
    t.add_row("CPU", f"{esc(hw.get('cpu_model') or '?')}  {hw['cpu_count']} threads  {isa_level(flags)}"
              + (f" ({esc(' '.join(flags)) or 'no AVX2'})" if flags is not None else " (the profile lists no cpu_flags)")
              + ("  Apple MPS" if hw.get("mps") else ""))
    t.add_row("RAM", f"{gib(hw['ram_available_bytes'])} free of {gib(hw['ram_total_bytes'])}")
    t.add_row("swap", f"{gib(hw['swap_free_bytes'])} free of {gib(hw['swap_total_bytes'])}")
    t.add_row("disk", f"{gib(hw['disk_free_bytes'])} free")
    t.add_row("OS", esc(hw.get("os") or "?") + ("  (WSL)" if hw["wsl"] else ""))
    out.append(t)

    sw = report["software"]
    t = Table(title="software")
    for col in ("package", "version", "build"):
        t.add_column(col)
    t.add_row("python", esc(sw.get("python") or "-"), "")
    for name in ("torch", "torchvision", "torchaudio", "axolotl", "transformers", "peft", "accelerate",
                 "bitsandbytes", "flash-attn"):
        build = sw.get("torch_build") or "" if name == "torch" and sw.get("torch") else ""
        t.add_row(name, esc(sw.get(name) or "") or "[dim]not installed[/dim]", esc(build))
    backend = sw.get("llama_cpp_backend")
    t.add_row("llama.cpp", esc(sw.get("llama_cpp") or "") or "[dim]not found[/dim]",
              esc(backend.upper() if backend in ("cpu", "cuda", "hip") else backend.capitalize() if backend
                  else "unrecorded" if sw.get("llama_cpp") else ""))
    t.add_row("ollama", esc(sw.get("ollama") or "") or ("[dim]off (TUTOR_WRAP_OLLAMA)[/dim]" if sw.get("ollama_off")
                                                       else "[dim]not on PATH[/dim]"), "")
    out.append(t)

    if report.get("findings"):
        t = Table(title="findings")
        for col in ("", "what", "fix"):
            t.add_column(col)
        for f in report["findings"]:
            t.add_row(f"[{_STYLE.get(f['severity'], '')}]{f['severity']}[/]", esc(f["what"]), esc(f.get("fix") or ""))
        out.append(t)
    if report.get("stages"):
        t = Table(title="stages")
        for col in ("stage", "verdict", "needs", "has", "why / remedy"):
            t.add_column(col)
        for s in report["stages"]:
            v = s["verdict"]
            t.add_row(s["stage"] + (f" ({s['resource']})" if s.get("resource") else ""), f"[{_STYLE.get(v, '')}]{v}[/]",
                      s.get("needs", ""), s.get("has", ""),
                      esc(s.get("why", "") + (f"\nfix: {s['remedy']}" if s.get("remedy") else "")))
        out.append(t)
    return out
