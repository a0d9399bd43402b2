"""`deepseekmoe report`: one self-contained HTML page for a run or a compare directory.

The page has no external references: CSS is inline and every plot is a PNG embedded as a data: URI. Sections,
each present when its input exists:
  * comparison tables (compare dir: results.json);
  * loss curves (training LM loss, and validation loss when logged) from metrics.jsonl;
  * expert load over training as heatmaps, one per MoE layer (the trainer's per-expert "expert_load" counts);
  * routing analysis (DIR/analysis/analysis.json, written by `compare` or `analyze --out DIR/analysis`):
    Figs. 4-5, the shared-expert swap, per-layer statistics, load histograms, co-activation, top tokens.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import tempfile
from pathlib import Path
from typing import Any, Callable

from ..filenames import METRICS_FILE
from .analyze import write_routing_plots
from .results import ANALYSIS_JSON, HEADERS, RESULTS_JSON, load_history, read_records, read_run, recipe_line, table_rows

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
tr.ref td { background: #eef6ff; } td.txt { text-align: left; } td.yes { color: #067d17; font-weight: 600; } td.no { color: #a15c00; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, p.note { color: #555; font-size: .9em; } code { background: #f5f5f5; padding: 0 .2em; }
.tok { font-family: ui-monospace, monospace; background: #f5f5f5; padding: 0 .25em; margin-right: .3em; }
"""


def _img(png: Path, caption: str) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _table(headers: list[str] | tuple[str, ...], rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        cells = "".join(f'<td class="{_cell_class(c)}">{html.escape(c)}</td>' for c in row)
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _cell_class(text: str) -> str:
    if text == "yes":
        return "yes"
    if text.startswith("no ("):
        return "no"
    return "" if text[:1].isdigit() or text[:1] in "+-–" else "txt"


# ------------------------------------------------------------------------------------------------ sections
def compare_section(results: dict[str, Any]) -> str:
    parts = ["<h2>Comparison</h2>", f"<p>{html.escape(recipe_line(results['recipe']))}</p>",
             '<p class="note">Gap = validation loss minus the reference model\'s (negative is better). A gap is '
             "called real only when it exceeds twice the pooled standard deviation over seeds. Paper numbers are "
             "the 2B models after 100B tokens and show the expected ordering, not comparable values.</p>"]
    for suite in results["suites"]:
        classes = ["ref" if m["label"] == suite["reference"] else "" for m in suite["models"]]
        rows = table_rows(suite, results["recipe"])
        parts += [f"<h3>{html.escape(suite['title'])}</h3>", _table(HEADERS, rows, classes),
                  f"<p>Observed order (lowest loss first): <b>{html.escape(suite['observed_order'] or '–')}</b>"]
        if suite["paper_note"]:
            parts.append(f"<br>Paper: {html.escape(suite['paper_note'])}.")
        parts.append("</p>")
    return "\n".join(parts)


def curves_section(runs: dict[str, list[dict[str, Any]]], tmp: Path, plots: Any) -> str:
    """runs: label -> read_run() dicts (one per seed)."""
    train = {k: [r["curve"] for r in v] for k, v in runs.items()}
    val = {k: [r["val_curve"] for r in v] for k, v in runs.items() if any(r["val_curve"] for r in v)}
    parts = ["<h2>Loss curves</h2>"]
    if any(any(c) for c in train.values()):
        png = plots.loss_curves(train, tmp / "train_curves.png", "training LM loss (nats/token)",
                                "Training loss")
        parts.append(_img(png, "Training language-model loss per step (mean over seeds; shading: min..max)."))
    if val:
        png = plots.loss_curves(val, tmp / "val_curves.png", "validation loss (nats/token)", "Validation loss")
        parts.append(_img(png, "Validation loss on the fixed validation windows at each evaluation."))
    return "\n".join(parts) if len(parts) > 1 else ""


def load_section(run_dirs: dict[str, Path], tmp: Path, plots: Any) -> str:
    parts = ["<h2>Expert load during training</h2>",
             '<p class="note">Each heatmap row is one routed expert, each column one logged training step; colour '
             "is the expert's share of the step's assignments relative to a perfectly even share (1.0). Bright "
             "bands are overloaded experts, black rows are experts that receive no tokens.</p>"]
    for i, (label, run_dir) in enumerate(run_dirs.items()):
        steps, loads = load_history(read_records(run_dir))
        if steps:
            png = plots.load_over_training(steps, loads, tmp / f"load_{i}.png", f"Expert load over training: {label}")
            parts.append(_img(png, f"{label}: per-layer expert load over training ({run_dir})."))
    return "\n".join(parts) if len(parts) > 2 else ""


def analysis_section(analysis: dict[str, Any], tmp: Path) -> str:
    results = analysis["checkpoints"]
    files = write_routing_plots(results, tmp)
    parts = ["<h2>Routing analysis</h2>",
             f"<p class=\"note\">On {analysis['batches']} fixed validation batches of {analysis['seq_len']} tokens "
             f"from {html.escape(str(analysis['data']))}.</p>"]
    if "fig4" in files:
        parts.append(_img(tmp / files["fig4"], "Paper Fig. 4: per token, the top fraction x of routed experts (by "
                          "routing probability) is disabled and the token is routed to the top-K of the rest. A "
                          "steeper rise means less redundancy among experts (the paper's sign of specialization)."))
    if "fig5" in files:
        parts.append(_img(tmp / files["fig5"], "Paper Fig. 5: the same trained model evaluated with fewer "
                          "activated routed experts (no retraining)."))
    parts.append(_specialization_table(results))
    for r in results:
        parts.append(_checkpoint_details(r, tmp, files))
    return "\n".join(parts)


def _specialization_table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        swap = r.get("shared_swap")
        fig4 = r.get("disable_top") or []
        rows.append([r["name"], f"{r['val_loss']:.4f}",
                     f"{fig4[1]['loss']:.4f}" if len(fig4) > 1 else "–",
                     f"{swap['swapped_loss']:.4f}" if swap else "–", r.get("skipped", "")])
    return _table(["checkpoint", "val loss", "top 1/16 disabled", "shared off + 1 routed", "note"], rows)


def _checkpoint_details(r: dict[str, Any], tmp: Path, files: dict[str, str]) -> str:
    if not r["layers"]:
        return ""
    rows = [[str(i), f"{l['max_over_mean']:.2f}", f"{l['cv']:.3f}", f"{l['load_entropy_normalized']:.3f}",
             "–" if l["token_entropy"] is None else f"{l['token_entropy']:.3f}", str(len(l["dead_experts"]))]
            for i, l in enumerate(r["layers"])]
    parts = [f"<h3>{html.escape(r['name'])}</h3>",
             _table(["MoE layer", "max/mean load", "CV of load", "load entropy / log E", "token entropy (nats)",
                     "dead experts"], rows)]
    for key, caption in (("load", "expert load histogram per MoE layer (red x: dead experts)"),
                         ("co-activation", "how often expert j is chosen together with expert i")):
        name = files.get(f"{r['name']} {key}")
        if name:
            parts.append(_img(tmp / name, f"{r['name']}: {caption}."))
    parts.append(_top_tokens(r["layers"][0]))
    return "\n".join(parts)


def _top_tokens(layer: dict[str, Any], experts: int = 12, tokens: int = 6) -> str:
    """The first MoE layer's preferred tokens of its busiest experts."""
    if not layer.get("top_tokens"):
        return ""
    busiest = sorted(range(len(layer["load"])), key=lambda e: -layer["load"][e])[:experts]
    rows = []
    for e in busiest:
        toks = " ".join(f'<span class="tok">{html.escape(_visible(t["text"]))}</span>{t["share"]:.0%}'
                        for t in layer["top_tokens"][e][:tokens])
        rows.append(f"<tr><td>{e}</td><td>{layer['load'][e]}</td><td style=\"text-align:left\">{toks}</td></tr>")
    return ("<p>First MoE layer, busiest experts: tokens most consistently routed to each (share of the token's "
            "occurrences sent to that expert).</p><table><thead><tr><th>expert</th><th>load</th><th>top tokens"
            f"</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _visible(text: str) -> str:
    return text.replace(" ", "␣").replace("\n", "⏎").replace("\t", "⇥") or "∅"


# ------------------------------------------------------------------------------------------------ page
def build_report(directory: Path) -> str:
    """The HTML page for a compare directory (results.json) or a run directory (metrics.jsonl)."""
    from . import plots

    results_path = directory / RESULTS_JSON
    analysis_path = directory / "analysis" / ANALYSIS_JSON
    results = json.loads(results_path.read_text()) if results_path.is_file() else None
    if results is None and not (directory / METRICS_FILE).is_file() and not analysis_path.is_file():
        raise FileNotFoundError(f"{directory} holds no {RESULTS_JSON}, {METRICS_FILE} or analysis/{ANALYSIS_JSON}")
    runs, run_dirs = _runs(directory, results)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        sections: list[Callable[[], str]] = [
            lambda: compare_section(results) if results else "",
            lambda: curves_section(runs, tmp, plots) if runs else "",
            lambda: load_section(run_dirs, tmp, plots),
            lambda: analysis_section(json.loads(analysis_path.read_text()), tmp) if analysis_path.is_file() else "",
        ]
        body = "\n".join(s() for s in sections)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    title = f"DeepSeekMoE report: {directory.resolve().name}"
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p class=\"note\">{html.escape(str(directory))}, generated {stamp}.</p>{body}</body></html>\n")


def _runs(directory: Path, results: dict[str, Any] | None) -> tuple[dict[str, list[dict]], dict[str, Path]]:
    """label -> per-seed run summaries, and label -> the seed-0 run directory (for load heatmaps)."""
    if results is None:
        if not (directory / METRICS_FILE).is_file():
            return {}, {}
        return {directory.name: [read_run(directory)]}, {directory.name: directory}
    runs: dict[str, list[dict]] = {}
    dirs: dict[str, Path] = {}
    for suite in results["suites"]:
        for m in suite["models"]:
            if m["label"] not in runs:  # run directories are found relative to the compare directory
                runs[m["label"]] = m["runs"]
                dirs[m["label"]] = directory / "runs" / m["preset"] / "seed0"
    return runs, dirs
