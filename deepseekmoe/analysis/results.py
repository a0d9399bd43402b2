"""Reading trainer run directories and rendering comparison tables (Markdown here, HTML in report.py).

A run directory's metrics.jsonl (written by the trainer, see deepseekmoe/train/metrics.py) gives:
  * the final validation loss / bits per byte: the "val" record with the highest step;
  * throughput: the median tokens_per_s of the "train" records;
  * curves: training lm_loss and val_loss against step;
  * expert load over training: the per-layer, per-expert counts ("expert_load") of the train records.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from ..fileio import write_text_atomically
from ..filenames import METRICS_FILE

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
ANALYSIS_JSON = "analysis.json"
HEADERS = ("model", "total params", "activated params", "FLOPs/token", "val loss (nats/token)", "bits/byte",
           "tokens/s", "gap to reference", "gap > 2x seed std?", "paper Pile loss (2B)")


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (aside, then rename)."""
    write_text_atomically(path, json.dumps(obj, indent=1) + "\n")


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_run(run_dir: Path) -> dict[str, Any]:
    """Final validation numbers, throughput and curves of one run directory (None where absent)."""
    records = read_records(run_dir)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    final = max(val, key=lambda r: r["step"]) if val else {}
    speeds = [r["tokens_per_s"] for r in train if r.get("tokens_per_s")]
    return {"run_dir": str(run_dir), "steps": final.get("step"), "val_loss": final.get("val_loss"),
            "val_bpb": final.get("val_bpb"), "tokens_per_s": statistics.median(speeds) if speeds else None,
            "curve": [(r["step"], r["lm_loss"]) for r in train if "lm_loss" in r],
            "val_curve": [(r["step"], r["val_loss"]) for r in val]}


def load_history(records: list[dict[str, Any]]) -> tuple[list[int], list[list[list[float]]]]:
    """(steps, loads[layer][i][expert]) from the train records that carry full per-expert counts."""
    rows = [r for r in records if r.get("kind") == "train" and r.get("expert_load")]
    if not rows:
        return [], []
    layers = len(rows[0]["expert_load"])
    return [r["step"] for r in rows], [[r["expert_load"][layer] for r in rows] for layer in range(layers)]


# ------------------------------------------------------------------------------------------------ tables
def human(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _pm(mean: float | None, std: float | None, digits: int = 4) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def _verdict(m: dict[str, Any], is_reference: bool) -> str:
    if is_reference:
        return "reference"
    if m.get("beyond_noise") is None:
        return "n/a (1 seed)" if m.get("gap") is not None else "–"
    return "yes" if m["beyond_noise"] else f"no (noise {m['noise']:.4f})"


def lr_label(lr: float) -> str:
    """0.004 -> '4e-3', 0.0005 -> '5e-4', 0.0025 -> '2.5e-3' (the scaling suite's directory names)."""
    mantissa, exponent = f"{lr:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def table_rows(suite: dict[str, Any], recipe: dict[str, Any] | None = None) -> list[list[str]]:
    """One row of strings per model, in HEADERS order; a model trained at another peak lr than the recipe's
    (the scaling suite's, each model at its best) names it after its label."""
    rows = []
    for m in suite["models"]:
        is_ref = m["label"] == suite["reference"]
        gap = "–" if m.get("gap") is None or is_ref else f"{m['gap']:+.4f}"
        own_lr = m.get("lr") is not None and "lr" not in (recipe or {})
        label = f"{m['label']} (lr {lr_label(m['lr'])})" if own_lr else m["label"]
        rows.append([label, human(m["total_params"]), human(m["active_params"]), human(m["flops_per_token"]),
                     _pm(m["val_loss_mean"], m["val_loss_std"]), _pm(m["val_bpb_mean"], m["val_bpb_std"]),
                     f"{m['tokens_per_s']:,.0f}" if m.get("tokens_per_s") else "–", gap, _verdict(m, is_ref),
                     f"{m['paper_loss']:.3f}" if m.get("paper_loss") else "–"])
    return rows


def recipe_line(recipe: dict[str, Any]) -> str:
    tokens = recipe["steps"] * recipe["batch_size"] * recipe["seq_len"]
    return (f"{recipe['steps']} steps x {recipe['batch_size']} x {recipe['seq_len']} tokens = {tokens:,} training "
            f"tokens per run, seeds 0..{recipe['seeds'] - 1}, validation on {recipe['eval_batches']} fixed "
            f"batches; data: {recipe['data'] or 'built-in corpus'}; scale: {recipe['scale']}"
            + (f"; peak lr {recipe['lr']:g}" if "lr" in recipe else ""))


def table_markdown(results: dict[str, Any]) -> str:
    lines = ["# Model comparison", "", recipe_line(results["recipe"]), "",
             "Gap = val loss minus the reference's (negative: better than the reference). A gap counts as real only "
             "when it exceeds 2 x the pooled std over seeds. Paper numbers are the 2B models after 100B tokens, for "
             "the ordering only.", ""]
    for suite in results["suites"]:
        lines += [f"## {suite['title']}", "", "| " + " | ".join(HEADERS) + " |",
                  "|" + "---|" * len(HEADERS)]
        lines += ["| " + " | ".join(row) + " |" for row in table_rows(suite, results["recipe"])]
        lines += ["", f"Observed order (val loss, lowest first): {suite['observed_order'] or '–'}", ""]
        if suite["paper_note"]:
            lines += [f"Paper: {suite['paper_note']}.", ""]
    return "\n".join(lines)
