"""`deepseekmoe compare --suite scaling`: the Table 1 models at several token budgets, and where the paper's
ordering appears.

Every budget is a full comparison of its own (its own steps and LR schedule, nothing reused from another budget),
kept in OUT/budget_<tokens>/ as one `compare` directory per peak learning rate (lr_<lr>/: recipe.json, runs/,
results.json), so it resumes and each lr can be read by `compare` and `report` alone; with --lr-search each model's
peak lr is searched alike at every budget (lr_search.py), otherwise every model trains at --lr. The budgets run
smallest first, seed 0 of every model before seed 1, so the first results come early. Layout of OUT:

    budget_<tokens>/lr_<lr>/      one table1 comparison per budget and peak lr
    budget_<tokens>/results.json  every model at its own peak lr, and the losses of the lr search
    scaling.json, scaling.md      per budget: each model's loss (mean ± std) and lr, the paper's pairwise claims
                                  judged against 2 x the pooled seed noise, routing entropy and gate mass; the trend
    scaling.png                   loss against tokens and against training FLOPs, entropy and gate mass

A claim "A < B" holds at a budget when B's mean loss exceeds A's by more than 2 x sqrt((s_A^2 + s_B^2) / 2) (sample
std over seeds), is reversed when A's exceeds B's by as much, and is within noise otherwise. The trend of each gap
is a least-squares line in log2(tokens); where a claim does not hold yet and its gap is shrinking, the budget at
which the line crosses zero is given, as an extrapolation and nothing more.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import torch

from ..convert.load import load_model
from ..data.builtin_cache import ensure_builtin_data
from ..data.dataset import read_meta
from ..errors import UserValueError
from .analyze import validation_batches
from ..train.config import TrainConfig
from .compare import SUITES, final_checkpoint, make_recipe, preset_for, run_dir_for, run_status
from .lr_search import Budget, lr_dir
from .results import RESULTS_JSON, lr_label, write_json
from .stats import RoutingStats

DEFAULT_BUDGETS = "0.5M,1M,2M,4M,8M"
# the paper's pairwise claims (Table 1): (better, worse) by preset suffix
CLAIMS = (("deepseekmoe", "gshard"), ("gshard", "switch"), ("gshard", "hash"), ("switch", "dense"),
          ("hash", "dense"), ("deepseekmoe", "dense"))
ROUTING_JSON = "routing.json"
SUMMARY_MD = "scaling.md"
ROUTING_BATCHES = 4
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}


def parse_budgets(text: str) -> list[int]:
    """'0.5M,1M,2M' -> [500000, 1000000, 2000000] training tokens per run, sorted, without repeats."""
    budgets = set()
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMB]?)\s*", item, flags=re.IGNORECASE)
        if not m or float(m.group(1)) <= 0:
            raise UserValueError(f"--budgets: {item.strip()!r} is not a token count such as 500K, 0.5M or 2M")
        budgets.add(int(float(m.group(1)) * _UNITS[m.group(2).upper()]))
    return sorted(budgets)


def budget_label(tokens: int, digits: int = 6) -> str:
    """500000 -> '500K'; with `digits`, at most that many significant digits (an extrapolated budget: '1.15M')."""
    for unit in ("B", "M", "K"):
        if tokens >= _UNITS[unit]:
            return f"{tokens / _UNITS[unit]:.{digits}g}{unit}"
    return f"{tokens:.{digits}g}"


def budget_recipes(budgets: list[int], **recipe_args: Any) -> list[tuple[int, Path, dict[str, Any]]]:
    """(tokens, directory name, recipe) per budget: steps = tokens / (batch x seq_len), at least 1."""
    per_step = recipe_args["batch_size"] * recipe_args["seq_len"]
    out = []
    for tokens in budgets:
        steps = max(1, round(tokens / per_step))
        out.append((tokens, Path(f"budget_{budget_label(tokens)}"), make_recipe(steps=steps, **recipe_args)))
    return out


def run_scaling_suite(out: Path, budgets: list[int], scale: str, lr: float | None = None, lr_search: bool = False,
                      workers: int = 1, **recipe_args: Any) -> int:
    """Every budget in turn (lr_search.Budget: seed 0 of each model at its start or searched lr, then the other
    seeds at its best); the summary is rewritten after each. `lr`: the first budget's starting peak lr."""
    suite = SUITES["table1"]
    presets = {sfx: preset_for(scale, sfx) for _, sfx in suite.models}
    plan = budget_recipes(budgets, scale=scale, **recipe_args)
    runs = [Budget(out / name, suite, presets, recipe, workers) for _, name, recipe in plan]
    for budget in runs:  # every budget's recipes checked before any training
        budget.check()
    starts = {sfx: lr or TrainConfig().lr for sfx in presets}
    finished = True
    for i, ((tokens, _, recipe), budget) in enumerate(zip(plan, runs)):
        print(f"budget {i + 1}/{len(plan)}: {budget_label(tokens)} tokens per run ({recipe['steps']} steps)"
              + (", peak lr searched per model" if lr_search else ""), file=sys.stderr, flush=True)
        finished, best, _ = budget.run(starts, lr_search)
        starts |= best
        write_summary(out, summarize(out, plan, presets))  # the budgets so far: a long suite reads as it goes
        if not finished:
            break
    print((out / SUMMARY_MD).read_text())
    return 0 if finished else 130


# ------------------------------------------------------------------------------------------------ routing
def final_routing_health(run_dir: Path, recipe: dict[str, Any]) -> dict[str, float] | None:
    """Mean normalised per-token routing entropy and gate mass over the MoE layers of a finished run's final
    checkpoint, on the first validation batches; cached in the run directory. None for a model without routing."""
    cache = run_dir / ROUTING_JSON
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("step") == recipe["steps"]:
            return saved["health"]
    ckpt = final_checkpoint(run_dir, recipe["steps"])
    if ckpt is None:  # finished, but its final checkpoint is gone: nothing to measure
        return None
    health = _measure_routing(ckpt, recipe)
    write_json(cache, {"step": recipe["steps"], "health": health})
    return health


def _measure_routing(ckpt: Path, recipe: dict[str, Any]) -> dict[str, float] | None:
    model, _ = load_model(ckpt)
    layers = sum(1 for i in range(model.config.num_hidden_layers) if model.config.is_moe_layer(i))
    if layers == 0:
        return None
    data = Path(recipe["data"]) if recipe["data"] else Path(ensure_builtin_data())
    stats = RoutingStats(model.config.n_routed_experts, layers)
    with torch.no_grad():
        for inputs, _ in validation_batches(data, recipe["batch_size"], recipe["seq_len"], ROUTING_BATCHES):
            stats.update(model(inputs).router_outputs)
    entropies = [s.token_entropy() for s in stats.layers]
    log_e = math.log(model.config.n_routed_experts)
    return {"token_entropy_normalized": (None if None in entropies else
                                         sum(entropies) / len(entropies) / log_e),
            "gate_mass": sum(s.gate_mass() for s in stats.layers) / layers}


# ------------------------------------------------------------------------------------------------ summary
def summarize(out: Path, plan: list[tuple[int, Path, dict[str, Any]]], presets: dict[str, str]) -> dict[str, Any]:
    rows, train_tokens = [], None
    for tokens, name, recipe in plan:
        results = json.loads((out / name / RESULTS_JSON).read_text()) if (out / name / RESULTS_JSON).is_file() \
            else None
        if results is None:
            continue
        train_tokens = train_tokens or training_split_tokens(recipe)
        models = {}
        for m in results["suites"][0]["models"]:
            models[m["suffix"]] = _model_row(m, tokens, out / name, recipe)
        claims = [judge(models[a], models[b]) | {"better": a, "worse": b} for a, b in CLAIMS]
        rows.append({"tokens": tokens, "label": budget_label(tokens), "steps": recipe["steps"],
                     "epochs": recipe["steps"] * recipe["batch_size"] / (train_tokens // (recipe["seq_len"] + 1)),
                     "models": models, "lr_search": results.get("lr_search", {}),
                     "claims": claims, "full_ordering": all(c["verdict"] == "holds" for c in claims)})
    first = next((r["label"] for r in rows if r["full_ordering"]), None)
    return {"recipe": {k: v for k, v in plan[0][2].items() if k != "steps"}, "budgets": rows,
            "labels": {m["suffix"]: m["label"] for m in _labels()}, "first_full_ordering": first,
            "trends": trends(rows)}


def training_split_tokens(recipe: dict[str, Any]) -> int:
    """Tokens in the training split the recipe's runs read (the built-in corpus when it names no data); a run
    reads it in windows of seq_len + 1 tokens, so `epochs` = samples / (tokens // (seq_len + 1))."""
    data = Path(recipe["data"]) if recipe["data"] else Path(ensure_builtin_data())
    return read_meta(data)["splits"]["train"]["tokens"]


def _labels() -> list[dict[str, str]]:
    return [{"suffix": sfx, "label": label} for label, sfx in SUITES["table1"].models]


def _model_row(m: dict[str, Any], tokens: int, budget_dir: Path, recipe: dict[str, Any]) -> dict[str, Any]:
    runs = [run_dir_for(lr_dir(budget_dir, m["lr"]), m["preset"], s) for s in range(recipe["seeds"])] \
        if m.get("lr") is not None else []
    healths = [final_routing_health(d, recipe) for d in runs if run_status(d, recipe["steps"]) == "done"]
    healths = [h for h in healths if h]
    entropy = [h["token_entropy_normalized"] for h in healths if h["token_entropy_normalized"] is not None]
    return {"label": m["label"], "preset": m["preset"], "lr": m.get("lr"), "loss_mean": m["val_loss_mean"],
            "loss_std": m["val_loss_std"], "seeds": m["num_seeds"], "training_flops": m["flops_per_token"] * tokens,
            "token_entropy_normalized": sum(entropy) / len(entropy) if entropy else None,
            "gate_mass": sum(h["gate_mass"] for h in healths) / len(healths) if healths else None}


def judge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Is a's loss below b's beyond 2 x the pooled seed noise? gap = loss(a) - loss(b) (negative: a is better)."""
    if a["loss_mean"] is None or b["loss_mean"] is None:
        return {"gap": None, "noise": None, "verdict": "no data"}
    gap = a["loss_mean"] - b["loss_mean"]
    if a["loss_std"] is None or b["loss_std"] is None:
        return {"gap": gap, "noise": None, "verdict": "n/a (1 seed)"}
    noise = 2 * math.sqrt((a["loss_std"] ** 2 + b["loss_std"] ** 2) / 2)
    verdict = "holds" if gap < -noise else "reversed" if gap > noise else "within noise"
    return {"gap": gap, "noise": noise, "verdict": verdict}


def trends(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per claim: the gap's least-squares slope per doubling of tokens and, when it does not hold yet but is
    shrinking, the budget at which the fitted line crosses zero."""
    out = []
    for a, b in CLAIMS:
        points = [(math.log2(r["tokens"]), c["gap"]) for r in rows for c in r["claims"]
                  if c["better"] == a and c["worse"] == b and c["gap"] is not None]
        entry: dict[str, Any] = {"better": a, "worse": b, "slope_per_doubling": None, "crossing_tokens": None}
        if len(points) >= 2:
            slope, intercept = _fit(points)
            entry["slope_per_doubling"] = slope
            last_gap = points[-1][1]
            if last_gap > 0 and slope < 0:
                entry["crossing_tokens"] = 2 ** min(-intercept / slope, 70)  # 70: beyond any budget (1e21)
        out.append(entry)
    return out


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return slope, my - slope * mx


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    from . import plots

    write_json(out / "scaling.json", summary)
    (out / SUMMARY_MD).write_text(summary_markdown(summary))
    if summary["budgets"]:
        plots.scaling_curves(summary, out / "scaling.png")


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.4f} ± {std:.4f}" if std is not None else f"{mean:.4f}"


def _claim_cell(c: dict[str, Any]) -> str:
    if c["gap"] is None:
        return "–"
    noise = f" (noise {c['noise']:.4f})" if c["noise"] is not None else ""
    return f"{c['gap']:+.4f}{noise}: {c['verdict']}"


def summary_markdown(summary: dict[str, Any]) -> str:
    labels, rows = summary["labels"], summary["budgets"]
    r = summary["recipe"]
    lines = ["# Scaling: the Table 1 models at several token budgets", "",
             f"Batches of {r['batch_size']} x {r['seq_len']} tokens, seeds 0..{r['seeds'] - 1}, validation on "
             f"{r['eval_batches']} fixed batches; data: {r['data'] or 'built-in corpus'}; scale: {r['scale']}"
             + ". Each budget is its own run with its own schedule; epochs: passes over the training split (beyond "
             "1, every window is seen again); lr: the peak learning rate each model was trained at.", ""]
    head = ["budget (tokens)", "steps", "epochs"] + list(labels.values())
    lines += ["## Validation loss (nats/token, mean ± std over seeds)", "", "| " + " | ".join(head) + " |",
              "|" + "---|" * len(head)]
    for row in rows:
        cells = [_pm(row["models"][sfx]["loss_mean"], row["models"][sfx]["loss_std"])
                 + (f" (lr {lr_label(row['models'][sfx]['lr'])})" if row["models"][sfx].get("lr") else "")
                 for sfx in labels]
        lines.append(f"| {row['label']} | {row['steps']} | {row['epochs']:.2f} | " + " | ".join(cells) + " |")
    lines += _search_lines(labels, rows)
    claim_names = [f"{labels[a]} < {labels[b]}" for a, b in CLAIMS]
    lines += ["", "## The paper's claims (gap = loss of the first minus the second; holds when below -2 x pooled "
              "seed std)", "", "| budget | " + " | ".join(claim_names) + " | full ordering |",
              "|" + "---|" * (len(CLAIMS) + 2)]
    for row in rows:
        lines.append(f"| {row['label']} | " + " | ".join(_claim_cell(c) for c in row["claims"])
                     + f" | {'yes' if row['full_ordering'] else 'no'} |")
    routed = [sfx for sfx in labels if sfx != "dense"]
    lines += ["", "## Routing: mean per-token entropy / log(E), and the routed experts' gate mass", "",
              "| budget | " + " | ".join(labels[s] for s in routed) + " |", "|" + "---|" * (len(routed) + 1)]
    for row in rows:
        cells = [_health(row["models"][sfx]) for sfx in routed]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    first = summary["first_full_ordering"]
    lines += ["", f"Smallest budget with the full ordering: {first or 'none of the budgets so far'}.", "",
              "## Trend of each gap (least squares in log2 tokens; an extrapolation)", ""]
    for t in summary["trends"]:
        name = f"{labels[t['better']]} < {labels[t['worse']]}"
        if t["slope_per_doubling"] is None:
            lines.append(f"- {name}: needs two budgets")
            continue
        cross = (f"; the line crosses zero near {budget_label(int(t['crossing_tokens']), digits=3)} tokens"
                 if t["crossing_tokens"] else "")
        lines.append(f"- {name}: gap changes by {t['slope_per_doubling']:+.4f} per doubling{cross}")
    return "\n".join(lines) + "\n"


def _search_lines(labels: dict[str, str], rows: list[dict[str, Any]]) -> list[str]:
    """Seed 0's loss at every peak lr tried, per budget and model (the lr each model was trained at in bold)."""
    if not any(len(t) > 1 for row in rows for t in row["lr_search"].values()):
        return []
    lines = ["", "## Peak learning rate, searched alike for every model (seed 0's loss at each lr tried)", ""]
    for row in rows:
        for sfx, tried in row["lr_search"].items():
            best = row["models"][sfx].get("lr")
            cells = [f"**{lr} {loss:.4f}**" if best is not None and lr == lr_label(best) else f"{lr} {loss:.4f}"
                     for lr, loss in sorted(tried.items(), key=lambda kv: float(kv[0]))]
            lines.append(f"- {row['label']}, {labels[sfx]}: " + ", ".join(cells))
    return lines


def _health(m: dict[str, Any]) -> str:
    entropy = "–" if m["token_entropy_normalized"] is None else f"{m['token_entropy_normalized']:.3f}"
    mass = "–" if m["gate_mass"] is None else f"{m['gate_mass']:.3f}"
    return f"{entropy} / {mass}"
