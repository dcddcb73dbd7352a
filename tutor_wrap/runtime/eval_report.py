"""The eval report as Markdown and as one self-contained HTML page (the loss curve inlined)."""

from __future__ import annotations

from pathlib import Path


def render_markdown(report: dict, loss_png: str | None) -> str:
    lines = [f"# Eval: {report['recipe']}", "",
             f"{report['n_prompts']} held-out prompts, temperature 0, seed {report['seed']}, "
             f"{report['quant_type']} GGUFs through llama.cpp, max {report['max_tokens']} tokens.", "",
             f"Primary metric: **{report['primary_metric']}** (higher is better; `heldout_ppl`, the perplexity "
             "of the held-out prompts with their reference answers, is lower-is-better).", "",
             "| metric | base | tuned | delta |", "|---|---|---|---|"]
    for k in report["base"]:
        b, t = report["base"][k], report["tuned"][k]
        lines.append(f"| {k} | {b:.3f} | {t:.3f} | {t - b:+.3f} |")
    if loss_png:
        lines += ["", f"![training loss]({loss_png})"]
    lines += ["", "## Outputs", ""]
    for i, row in enumerate(report["prompts"], 1):
        lines += [f"### {i}. {row['instruction']}", "", "**base**" + (" (pass)" if row["base"]["format_pass"] else ""), "",
                  "```text", row["base"]["text"].replace("```", "'''"), "```", "",
                  "**tuned**" + (" (pass)" if row["tuned"]["format_pass"] else ""), "",
                  "```text", row["tuned"]["text"].replace("```", "'''"), "```", ""]
    return "\n".join(lines)


def render_html(report: dict, loss_png: Path | None) -> str:
    """A self-contained page: the summary table with deltas, the loss curve inline, outputs side by side."""
    import base64
    import html

    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(k)}{' *' if k == report['primary_metric'] else ''}</td><td>{report['base'][k]:.3f}</td>"
        f"<td>{report['tuned'][k]:.3f}</td><td>{report['tuned'][k] - report['base'][k]:+.3f}</td></tr>"
        for k in report["base"])
    img = ""
    if loss_png is not None and loss_png.is_file():
        img = ('<h2>Training loss</h2><img alt="training loss" src="data:image/png;base64,'
               + base64.b64encode(loss_png.read_bytes()).decode() + '">')
    pairs = "".join(
        f"<tr><td class=q>{i}. {esc(p['instruction'])}</td>"
        f"<td class={'pass' if p['base']['format_pass'] else 'fail'}><pre>{esc(p['base']['text'])}</pre></td>"
        f"<td class={'pass' if p['tuned']['format_pass'] else 'fail'}><pre>{esc(p['tuned']['text'])}</pre></td></tr>"
        for i, p in enumerate(report["prompts"], 1))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Eval: {esc(report['recipe'])}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}}pre{{white-space:pre-wrap;margin:0;max-width:520px}}
.pass{{background:#eaffea}}.fail{{background:#fff0f0}}.q{{max-width:200px}}</style></head><body>
<h1>Eval: {esc(report['recipe'])}</h1>
<p>{report['n_prompts']} held-out prompts, temperature 0, seed {report['seed']}, {esc(report['quant_type'])} GGUFs through
llama.cpp, at most {report['max_tokens']} tokens. Primary metric: <b>{esc(report['primary_metric'])}</b> (higher is better;
green = passes every format check).</p>
<table><tr><th>metric</th><th>base</th><th>tuned</th><th>delta</th></tr>{rows}</table>{img}
<h2>Outputs</h2><table><tr><th>prompt</th><th>base</th><th>tuned</th></tr>{pairs}</table></body></html>
"""
