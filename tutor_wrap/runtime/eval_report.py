"""The eval report as Markdown and as one self-contained HTML page (the loss curve inlined).

Columns are the report's arms: the base in the training format, the base in its own chat template (when it has
one) and the tuned model. A cell is green only when the answer passes every check, content included.
"""

from __future__ import annotations

from pathlib import Path

from tutor_wrap.runtime.html_page import page, png_img

ARM_LABELS = {"base": "base (training format)", "base_own_template": "base (own template)", "tuned": "tuned"}


def _metrics(report: dict) -> list[str]:
    return list(report["tuned"])


def _value(report: dict, arm: str, k: str) -> str:
    v = report[arm].get(k)
    return "-" if v is None else f"{v:.3f}"


def _checks_line(answer: dict) -> str:
    marks = [f"{name} {'yes' if ok else 'no'}" for name, ok in answer["checks"].items()]
    marks = [f"eos {'yes' if answer['eos'] else 'no'}", f"runaway {'yes' if answer['runaway'] else 'no'}", *marks]
    why = "; ".join(f"{name}: {text}" for name, text in (answer.get("details") or {}).items())
    return "; ".join(marks) + (f" ({why})" if why else "")


def _stats_lines(report: dict) -> list[str]:
    out = []
    for name, st in report.get("stats", {}).items():
        arm = name.removeprefix("tuned_vs_")
        out.append(f"tuned vs {ARM_LABELS.get(arm, arm)} on {report['primary_metric']}: {st['wins']} prompts better, "
                   f"{st['losses']} worse, {st['ties']} the same; exact McNemar p = {st['p_value']:.2g}"
                   + ("" if st["significant"] else " (not significant at 0.05)")
                   + f"; 95% intervals {st['a_ci95']} vs {st['b_ci95']}")
    return out


def overlap_line(report: dict) -> str | None:
    """The held-out prompts that are copies of training rows, and the primary metric without them."""
    ov, wo = report.get("overlap"), report.get("without_overlap")
    if not ov or not wo:
        return None
    n, pm, best = len(ov["eval_lines"]), report["primary_metric"], report.get("best_baseline", "base")
    exact = len({p["line"] for p in ov["exact"]})
    head = (f"{n} of {report['n_prompts']} held-out prompts overlap the training rows ({exact} exact, {n - exact} "
            f"near-copies at Jaccard >= {ov['threshold']}; eval lines {', '.join(map(str, ov['eval_lines'][:12]))}"
            + (" ..." if n > 12 else "") + ")")
    if not wo["n_prompts"]:
        return head + ": no prompt is left without them"
    st = wo["stats"][f"tuned_vs_{best}"]
    return (head + f"; without them ({wo['n_prompts']} prompts): {pm} tuned {wo['tuned'][pm]:.3f} vs "
            f"{ARM_LABELS.get(best, best)} {wo[best][pm]:.3f}, {st['wins']} better, {st['losses']} worse, "
            f"{st['ties']} the same, exact McNemar p = {st['p_value']:.2g}")


def render_markdown(report: dict, loss_png: str | None) -> str:
    arms = report.get("arms", ["base", "tuned"])
    best = report.get("best_baseline", "base")
    lines = [f"# Eval: {report['recipe']}", "",
             f"{report['n_prompts']} held-out prompts, temperature 0, seed {report['seed']}, "
             f"{report['quant_type']} GGUFs through llama-server, max {report['max_tokens']} tokens.", "",
             f"Primary metric: **{report['primary_metric']}** (higher is better; `heldout_ppl`, the perplexity "
             "of the held-out prompts with their reference answers, is lower-is-better). The tune is compared with "
             f"the better baseline: **{ARM_LABELS.get(best, best)}**.", "",
             "| metric | " + " | ".join(ARM_LABELS.get(a, a) for a in arms) + " | delta vs best base |",
             "|---" * (len(arms) + 2) + "|"]
    for k in _metrics(report):
        b, t = report[best].get(k), report["tuned"].get(k)
        delta = f"{t - b:+.3f}" if b is not None and t is not None else "-"
        lines.append(f"| {k} | " + " | ".join(_value(report, a, k) for a in arms) + f" | {delta} |")
    lines += ["", *(f"- {s}" for s in _stats_lines(report))]
    if ov := overlap_line(report):
        lines += ["", f"**Overlap with the training data:** {ov}."]
    if loss_png:
        lines += ["", f"![training loss]({loss_png})"]
    lines += ["", "## Outputs", ""]
    for i, row in enumerate(report["prompts"], 1):
        lines += [f"### {i}. {row['instruction']}" + (" (overlaps the training rows)" if row.get("overlaps_training")
                                                      else ""), ""]
        for a in arms:
            ans = row[a]
            lines += [f"**{ARM_LABELS.get(a, a)}**" + (" (pass)" if ans.get("all_pass", ans["format_pass"]) else "")
                      + f": {_checks_line(ans)}", "", "```text", ans["text"].replace("```", "'''"), "```", ""]
    return "\n".join(lines)


def render_html(report: dict, loss_png: Path | None) -> str:
    """A self-contained page: the summary table, the statistics, the loss curve inline, outputs side by side."""
    import html

    esc = html.escape
    arms = report.get("arms", ["base", "tuned"])
    best = report.get("best_baseline", "base")
    head = "".join(f"<th>{esc(ARM_LABELS.get(a, a))}</th>" for a in arms)
    rows = ""
    for k in _metrics(report):
        b, t = report[best].get(k), report["tuned"].get(k)
        delta = f"{t - b:+.3f}" if b is not None and t is not None else "-"
        rows += (f"<tr><td>{esc(k)}{' *' if k == report['primary_metric'] else ''}</td>"
                 + "".join(f"<td>{_value(report, a, k)}</td>" for a in arms) + f"<td>{delta}</td></tr>")
    stats = "".join(f"<li>{esc(s)}</li>" for s in _stats_lines(report))
    if ov := overlap_line(report):
        stats += f"<li><b>Overlap with the training data:</b> {esc(ov)}</li>"
    img = png_img(loss_png, "training loss")
    img = f"<h2>Training loss</h2>{img}" if img else ""

    def cell(ans: dict) -> str:
        ok = ans.get("all_pass", ans["format_pass"])
        return (f"<td class={'pass' if ok else 'fail'}><div class=c>{esc(_checks_line(ans))}</div>"
                f"<pre>{esc(ans['text'])}</pre></td>")

    pairs = "".join(f"<tr><td class=q>{i}. {esc(p['instruction'])}"
                    + (" <i>(overlaps the training rows)</i>" if p.get("overlaps_training") else "") + "</td>" + "".join(cell(p[a]) for a in arms) + "</tr>"
                    for i, p in enumerate(report["prompts"], 1))
    body = f"""<h1>Eval: {esc(report['recipe'])}</h1>
<p>{report['n_prompts']} held-out prompts, temperature 0, seed {report['seed']}, {esc(report['quant_type'])} GGUFs through
llama-server, at most {report['max_tokens']} tokens. Primary metric: <b>{esc(report['primary_metric'])}</b> (higher is
better), compared with the better baseline, {esc(ARM_LABELS.get(best, best))}. Green = passes every check, the code
running included; each cell lists the checks and the code's error line.</p>
<table><tr><th>metric</th>{head}<th>delta vs best base</th></tr>{rows}</table><ul>{stats}</ul>{img}
<h2>Outputs</h2><table><tr><th>prompt</th>{head}</tr>{pairs}</table>"""
    return page(f"Eval: {report['recipe']}", body, css=".pass{background:#eaffea}.fail{background:#fff0f0}"
                ".q{min-width:8em;max-width:200px}.c{font-size:80%;color:#555}pre{max-width:420px}")
