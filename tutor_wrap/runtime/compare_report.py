"""The pages of `compare` and `runs`: the terminal tables and a self-contained HTML page, from the plain dicts
tutor_wrap/compare.py makes (run and recipe names, config values and prompts are the user's text: escaped)."""

from __future__ import annotations

import html
from pathlib import Path

from tutor_wrap.runtime.html_page import page, png_img
from tutor_wrap.runtime.eval_report import ARM_LABELS   # the eval report's names for its arms

SHORT = {"base": "base", "base_own_template": "base own tmpl", "tuned": "tuned"}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "-" if v is None else str(v)


def _metrics(data: dict) -> list[str]:
    keys: list[str] = []
    for r in data["runs"]:
        for arm in (r["eval"] or {}).values():
            keys += [k for k in (arm or {}) if k not in keys]
    return keys


def paired_line(p: dict) -> str:
    if "skipped" in p:
        return f"{p['b']} against {p['a']}: {p['skipped']}"
    only = (f"; {p['only_a']} prompts only in the first, {p['only_b']} only in the second"
            if p["only_a"] or p["only_b"] else "")
    return (f"{p['b']} against {p['a']} on {p['metric']}, {p['shared_prompts']} shared prompts{only}: "
            f"{p['wins']} better, {p['losses']} worse, {p['ties']} tied; exact McNemar p = {p['p_value']:.3g} "
            f"({'significant' if p['significant'] else 'not significant'} at 0.05); pass rate (95% interval) "
            f"{p['b_ci95'][0]:.2f}-{p['b_ci95'][1]:.2f} against {p['a_ci95'][0]:.2f}-{p['a_ci95'][1]:.2f}")


def tables(data: dict) -> list:
    """Rich tables: what differs, the metrics per run and arm, the paired results."""
    from rich.markup import escape
    from rich.table import Table

    names = [r["label"] for r in data["runs"]]
    diff = Table(title="what differs (axolotl.yml and eval settings)")
    diff.add_column("key")
    for n in names:
        diff.add_column(escape(n))
    for d in data["differences"]:
        diff.add_row(escape(d["key"]), *(escape(v) for v in d["values"]))
    if not data["differences"]:
        diff.add_row("(nothing: same config and eval settings)", *[""] * len(names))
    metrics = Table(title="eval metrics per arm (runs numbered as given)")
    metrics.add_column("metric", no_wrap=True)
    cols = [(i, arm) for i, r in enumerate(data["runs"]) for arm in (r["eval"] or {})]
    for i, arm in cols:
        metrics.add_column(escape(f"{i + 1}: {SHORT.get(arm, arm)}"))
    for k in _metrics(data):
        metrics.add_row(escape(k), *(_fmt((data["runs"][i]["eval"][arm] or {}).get(k)) for i, arm in cols))
    pairs = Table(title="fine-tuned against fine-tuned, prompt by prompt")
    pairs.add_column("result")
    for p in data["paired"]:
        pairs.add_row(escape(paired_line(p)))
    for n in data["notes"]:
        pairs.add_row(escape(f"note: {n}"))
    return [diff, metrics, pairs] if cols else [diff, pairs]    # no run evaluated: no empty table


def runs_table(summaries: list[dict], stages: tuple[str, ...], title: str = "runs"):
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=title)
    t.add_column("run", overflow="fold")
    for col in ("recipe", "stages", "time", "primary metric: tuned / best baseline"):
        t.add_column(col)
    for s in summaries:
        if s["stages"] is None:
            t.add_row(escape(s["path"]), "?", escape("; ".join(s["notes"])), "-", "-")
            continue
        secs = sum(v["seconds"] or 0 for v in s["stages"].values())
        pm = s["primary"]
        line = stages_line(s["stages"], stages) + "".join(f"; {n}" for n in s["notes"])
        t.add_row(escape(s["path"]), escape(s["recipe"]), escape(line), f"{secs / 60:.1f} min" if secs else "-",
                  escape(f"{pm[0]}: {_fmt(pm[1])} / {_fmt(pm[2])}") if pm else "-")
    return t


def stages_line(status: dict, stages: tuple[str, ...]) -> str:
    """"all done", or the stages done and what the others are (failed, not run, ...)."""
    done = [n for n in stages if status[n]["status"] == "done"]
    if len(done) == len(stages):
        return "all done"
    rest = [f"{n} {status[n]['status']}" for n in stages if n not in done]
    return (f"done to {done[-1]}; " if done else "") + ", ".join(rest)


def render_html(data: dict, loss_png: Path | None) -> str:
    esc = html.escape
    names = [r["label"] for r in data["runs"]]
    head = "".join(f"<th>{esc(n)}</th>" for n in names)
    diff = "".join(f"<tr><td>{esc(d['key'])}</td>" + "".join(f"<td>{esc(v)}</td>" for v in d["values"]) + "</tr>"
                   for d in data["differences"]) or f"<tr><td colspan={len(names) + 1}>nothing differs</td></tr>"
    cols = [(i, arm) for i, r in enumerate(data["runs"]) for arm in (r["eval"] or {})]
    mhead = "".join(f"<th>{esc(names[i])}<br>{esc(ARM_LABELS.get(arm, arm))}</th>" for i, arm in cols)
    mrows = "".join(f"<tr><td>{esc(k)}</td>" + "".join(
        f"<td>{esc(_fmt((data['runs'][i]['eval'][arm] or {}).get(k)))}</td>" for i, arm in cols) + "</tr>"
                    for k in _metrics(data))
    pairs = "".join(f"<li>{esc(paired_line(p))}</li>" for p in data["paired"])
    notes = "".join(f"<li>{esc(n)}</li>" for n in data["notes"])
    img = png_img(loss_png, "training loss of every run")
    img = f"<h2>Training loss</h2>{img}" if img else ""
    title = "Compare: " + " / ".join(names)
    return page(title, f"""<h1>{esc(title)}</h1>
<h2>What differs</h2><p>The trainer's config (axolotl.yml, flattened) and the eval settings, where the runs differ.</p>
<table><tr><th>key</th>{head}</tr>{diff}</table>
<h2>Fine-tuned against fine-tuned, prompt by prompt</h2><ul>{pairs or '<li>no paired test: see the notes</li>'}</ul>
{f'<h2>Notes</h2><ul>{notes}</ul>' if notes else ''}
{f'<h2>Eval metrics per arm</h2><table><tr><th>metric</th>{mhead}</tr>{mrows}</table>' if cols else ''}{img}""")
