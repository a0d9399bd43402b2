"""`deepseekmoe compare`: train the paper's comparison suites with one recipe and write an honest table.

Every model of a suite is trained by the trainer (`deepseekmoe.train.run.run_training`) on the same data,
with the same recipe (steps, batch, sequence length, LR schedule), the same seeds 0..S-1 and so the same token
budget. Layout of OUT:

    recipe.json                   the recipe; a later call with a different one is refused (results would mix)
    runs/<preset>/seed<k>/        one trainer run directory per (model, seed), shared by the suites
    logs/<preset>-seed<k>.log     the trainer's output of a run trained in a child process (--jobs 2 or more)
    results.json, results.md      the tables (see `table_rows`), rewritten after every finished run
    loss_curves.png               per suite: training LM loss (mean over seeds, min..max shaded)
    analysis/                     routing statistics and Figs. 4-5 on seed 0's final checkpoints (--analyze)

Resuming: a finished run (final checkpoint and final validation record at the last step) is skipped, a run with
a checkpoint is continued with the trainer's --resume, a run directory without a checkpoint is started afresh.
Noise: the gap of a model to the suite's reference is called real only when it exceeds 2 x the pooled std over
seeds, sqrt((s_a^2 + s_b^2) / 2) (sample std, ddof=1); with one seed no gap can be judged and the table says so.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..accounting import count
from ..checkpoint import list_checkpoints
from ..config import ModelConfig
from ..convert.load import load_model
from ..data.builtin_cache import ensure_builtin_data
from ..errors import UserError, UserValueError
from ..filenames import CONFIG_FILE, RUN_CONFIG_FILE
from ..presets import load_preset
from ..train.config import load_config
from ..train.run import run_training
from .analyze import analyze_model, token_decoder, validation_batches, write_routing_plots
from .results import ANALYSIS_JSON, RESULTS_JSON, RESULTS_MD, read_records, read_run, table_markdown, write_json

RECIPE_JSON = "recipe.json"


@dataclass(frozen=True)
class Suite:
    title: str
    models: tuple[tuple[str, str], ...]
    """(label, preset suffix) in table order."""
    reference: str
    """Suffix of the model the others are compared with."""
    paper_loss: tuple[tuple[str, float], ...] = ()
    """The paper's Pile validation loss per suffix (2B scale, 100B tokens), where printed."""
    paper_note: str = ""


SUITES: dict[str, Suite] = {
    "table1": Suite(
        "Table 1: DeepSeekMoE against the baselines at equal total parameters",
        (("Dense", "dense"), ("Hash Layer", "hash"), ("Switch", "switch"), ("GShard", "gshard"),
         ("DeepSeekMoE", "deepseekmoe")), "deepseekmoe",
        (("dense", 2.060), ("hash", 1.932), ("switch", 1.881), ("gshard", 1.867), ("deepseekmoe", 1.808)),
        "DeepSeekMoE < GShard < Switch ~ Hash < Dense in Pile loss"),
    "ablation": Suite(
        "Figure 3 ablation: shared-expert isolation and fine-grained segmentation",
        (("GShard (0+2/16)", "gshard"), ("+ shared isolation (1+1/15)", "ablation-shared"),
         ("+ fine-grained m=2 (1+3/31)", "ablation-m2"), ("+ m=4 = DeepSeekMoE (1+7/63)", "deepseekmoe")),
        "deepseekmoe", (), "every step improves the benchmarks (bars only, no losses printed)"),
    "shared-ratio": Suite(
        "Shared : routed ratio (64 experts of 1/4 size, 8 activated)",
        (("1 shared + 7/63", "deepseekmoe"), ("2 shared + 6/62", "shared2"), ("4 shared + 4/60", "shared4")),
        "deepseekmoe", (("deepseekmoe", 1.808), ("shared2", 1.806), ("shared4", 1.811)),
        "all three within 0.005 in Pile loss; the 1:3 ratio was adopted"),
    "upper-bound": Suite(
        "Table 2: DeepSeekMoE against larger GShard and the Dense x16 upper bound",
        (("GShard x1.5", "gshard-x1.5"), ("Dense x16", "dense-x16"), ("DeepSeekMoE", "deepseekmoe")),
        "deepseekmoe", (("gshard-x1.5", 1.808), ("dense-x16", 1.806), ("deepseekmoe", 1.808)),
        "DeepSeekMoE matches GShard x1.5 and nearly Dense x16"),
}
SCALE_NAMES = {"2b": {"deepseekmoe": "deepseekmoe-2b", "dense": "dense-0.2b"}}
DEFAULT_STEPS = {"tiny": 400, "small": 400}


def preset_for(scale: str, suffix: str) -> str:
    name = SCALE_NAMES.get(scale, {}).get(suffix, f"{scale}-{suffix}")
    load_preset(name)  # a UserError naming the choices when the scale has no such model
    return name


def custom_suite(presets: list[str]) -> Suite:
    """A suite of explicit presets; the last one is the reference."""
    for name in presets:
        load_preset(name)
    return Suite("Custom comparison", tuple((p, p) for p in presets), presets[-1])


def resolve_suites(suite: str, scale: str, models: list[str] | None) -> dict[str, tuple[Suite, dict[str, str]]]:
    """{suite name: (suite, {suffix: preset})}."""
    if models:
        s = custom_suite(models)
        return {"custom": (s, {p: p for p in models})}
    names = list(SUITES) if suite == "all" else [suite]
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise UserValueError(f"unknown suite {unknown[0]!r}; choose one of {', '.join(SUITES)}, all")
    return {n: (SUITES[n], {sfx: preset_for(scale, sfx) for _, sfx in SUITES[n].models}) for n in names}


# ------------------------------------------------------------------------------------------------ runs
def run_dir_for(out: Path, preset: str, seed: int) -> Path:
    return out / "runs" / preset / f"seed{seed}"


def run_status(run_dir: Path, steps: int) -> str:
    """'done' (its final validation at the last step is recorded), 'partial' (has a checkpoint) or 'new'.

    A finished run needs no checkpoint: its metrics.jsonl holds its results, so a suite's small files (metrics,
    configs, results) kept without the checkpoints still resume as finished."""
    if any(r.get("kind") == "val" and r.get("step") == steps for r in read_records(run_dir)):
        return "done"
    return "partial" if list_checkpoints(run_dir) else "new"


def final_checkpoint(run_dir: Path, steps: int) -> Path | None:
    """The checkpoint of the last step, when the run still has it."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts and ckpts[-1].name.endswith(f"{steps:08d}") else None


def recipe_settings(recipe: dict[str, Any], seed: int) -> dict[str, Any]:
    """The trainer's TrainConfig values for one run of the suite's recipe."""
    steps = recipe["steps"]
    return {"seed": seed, "batch_size": recipe["batch_size"], "seq_len": recipe["seq_len"],
            "warmup_steps": recipe["warmup_steps"], "eval_batches": recipe["eval_batches"],
            "log_every": max(1, min(10, steps // 20)), "eval_every": max(1, steps // 4),
            "save_every": recipe["save_every"], "keep_last": 1, "sample_tokens": 0, "tensorboard": False,
            **({"lr": recipe["lr"]} if "lr" in recipe else {})}


def train_run(preset: str, seed: int, run_dir: Path, recipe: dict[str, Any], resume: bool) -> int:
    """One trainer run (in this process); returns the trainer's exit code (130 when interrupted)."""
    return run_training(preset=preset, data=recipe["data"], out=str(run_dir), max_steps=recipe["steps"],
                        resume=resume, train=recipe_settings(recipe, seed))


def check_recipe(out: Path, recipe: dict[str, Any]) -> None:
    path = out / RECIPE_JSON
    if path.is_file():
        old = json.loads(path.read_text())
        changed = sorted(k for k in recipe.keys() | old.keys() if k != "seeds" and old.get(k) != recipe.get(k))
        if changed:
            listed = ", ".join(f"{k}={old.get(k)}" for k in changed)
            raise UserError(f"{out} holds runs made with a different recipe ({listed}); use another --out")


def _record_recipe(out: Path, recipe: dict[str, Any]) -> None:
    """Write recipe.json once a run has written something: a command refused before that (a bad argument) leaves
    nothing behind, so the corrected command is not refused as a different recipe."""
    if not (out / RECIPE_JSON).is_file():
        write_json(out / RECIPE_JSON, recipe)


def run_one(preset: str, seed: int, out: Path, recipe: dict[str, Any], head: str, child: bool = False) -> bool:
    """Train one (preset, seed) of OUT unless it is done: afresh, or resumed from its checkpoint; False when
    interrupted. `child`: in a child process (`train_child`)."""
    run_dir = run_dir_for(out, preset, seed)
    status = run_status(run_dir, recipe["steps"])
    if status == "done":
        print(f"{head}: done, skipped", file=sys.stderr, flush=True)
        return True
    if status == "new" and run_dir.exists():
        shutil.rmtree(run_dir)  # started but never checkpointed: nothing to keep
    print(f"{head}: {'resuming' if status == 'partial' else 'training'}", file=sys.stderr, flush=True)
    try:
        code = (train_child if child else train_run)(preset, seed, run_dir, recipe, resume=status == "partial")
    finally:
        if run_dir.exists():
            _record_recipe(out, recipe)
    if child and code not in (0, 130):
        raise RuntimeError(f"{head}: the trainer exited with code {code}; its output: {child_log(out, preset, seed)}")
    if code != 0:
        print(f"{head}: interrupted; run the same command again to resume", file=sys.stderr)
        return False
    return True


def child_log(out: Path, preset: str, seed: int) -> Path:
    return out / "logs" / f"{preset}-seed{seed}.log"


def train_child(preset: str, seed: int, run_dir: Path, recipe: dict[str, Any], resume: bool) -> int:
    """train_run in a child process with this process's environment (so its thread count, and so the same bits
    as in this process), its output appended to OUT/logs/<preset>-seed<k>.log."""
    out = run_dir.parents[2]
    log = child_log(out, preset, seed)
    log.parent.mkdir(parents=True, exist_ok=True)
    job = json.dumps({"preset": preset, "seed": seed, "run_dir": str(run_dir), "recipe": recipe, "resume": resume})
    with open(log, "a") as f:
        return subprocess.run([sys.executable, "-m", "deepseekmoe.analysis.child", job], stdout=f,
                              stderr=subprocess.STDOUT).returncode


def run_all(jobs: list[tuple[str, int]], out: Path, recipe: dict[str, Any], workers: int = 1) -> bool:
    """Train every (preset, seed) not yet done, `workers` at a time (more than one: in child processes), with
    progress; False when interrupted."""
    started, trained = time.perf_counter(), []
    lock = threading.Lock()

    def one(i: int, job: tuple[str, int]) -> bool:
        preset, seed = job
        head = f"[{i + 1}/{len(jobs)}] {preset} seed {seed}"
        was_done = run_status(run_dir_for(out, preset, seed), recipe["steps"]) == "done"
        if not run_one(preset, seed, out, recipe, head, child=workers > 1):
            return False
        if not was_done:
            with lock:
                trained.append(job)
                elapsed = time.perf_counter() - started
                left = sum(run_status(run_dir_for(out, p, s), recipe["steps"]) != "done" for p, s in jobs)
                print(f"{head}: finished; {elapsed / 60:.1f} min so far, about "
                      f"{elapsed / len(trained) * left / workers / 60:.0f} min left for {left} run(s)",
                      file=sys.stderr, flush=True)
        return True

    if workers == 1:
        return all(one(i, job) for i, job in enumerate(jobs))  # stops at the first interrupted run
    with ThreadPoolExecutor(workers) as pool:
        return all(list(pool.map(one, range(len(jobs)), jobs)))


# ------------------------------------------------------------------------------------------------ results
def model_results(preset: str, label: str, out: Path, recipe: dict[str, Any]) -> dict[str, Any]:
    acc = count(run_model_config(run_dir_for(out, preset, 0)) or load_preset(preset), recipe["seq_len"])
    runs = [read_run(run_dir_for(out, preset, s)) | {"seed": s} for s in range(recipe["seeds"])]
    finished = [r for r in runs if r.get("steps") == recipe["steps"]]  # a stopped run's last val is not final
    losses = [r["val_loss"] for r in finished if r.get("val_loss") is not None]
    bpbs = [r["val_bpb"] for r in finished if r.get("val_bpb") is not None]
    speeds = [r["tokens_per_s"] for r in runs if r.get("tokens_per_s")]
    return {"label": label, "preset": preset, "total_params": acc.total_params,
            "active_params": acc.active_params, "flops_per_token": acc.flops_per_token,
            "val_loss_mean": _mean(losses), "val_loss_std": _std(losses), "val_bpb_mean": _mean(bpbs),
            "val_bpb_std": _std(bpbs), "tokens_per_s": _mean(speeds), "num_seeds": len(losses), "runs": runs}


def run_model_config(run_dir: Path) -> ModelConfig | None:
    """The model config a run actually trained (vocabulary bound to the data): its latest checkpoint's, else its
    config.yaml's (a finished run kept without checkpoints)."""
    ckpts = list_checkpoints(run_dir)
    if ckpts:
        return ModelConfig.from_dict(json.loads((ckpts[-1] / CONFIG_FILE).read_text()))
    if (run_dir / RUN_CONFIG_FILE).is_file():
        return load_config(run_dir / RUN_CONFIG_FILE).model
    return None


def _mean(xs: list[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def _std(xs: list[float]) -> float | None:
    return statistics.stdev(xs) if len(xs) > 1 else None


def gap_to_reference(m: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """Loss gap (model - reference) and whether it exceeds 2 x the pooled seed std."""
    if m["val_loss_mean"] is None or ref["val_loss_mean"] is None:
        return {"gap": None, "noise": None, "beyond_noise": None}
    gap = m["val_loss_mean"] - ref["val_loss_mean"]
    if m["val_loss_std"] is None or ref["val_loss_std"] is None:
        return {"gap": gap, "noise": None, "beyond_noise": None}
    noise = 2 * math.sqrt((m["val_loss_std"] ** 2 + ref["val_loss_std"] ** 2) / 2)
    return {"gap": gap, "noise": noise, "beyond_noise": abs(gap) > noise}


def suite_results(name: str, suite: Suite, presets: dict[str, str], out: Path, recipe: dict[str, Any],
                  at: dict[str, tuple[Path, dict[str, Any]]] | None = None) -> dict[str, Any]:
    """The suite's table; `at` gives, per suffix, another (directory, recipe) to read a model's runs from (the
    scaling suite's model at its own learning rate), recorded in its row as "lr"."""
    models = []
    for label, sfx in suite.models:
        where, rec = (at or {}).get(sfx, (out, recipe))
        models.append(model_results(presets[sfx], label, where, rec) | {"suffix": sfx, "lr": rec.get("lr")})
    ref = next(m for m in models if m["suffix"] == suite.reference)
    paper = dict(suite.paper_loss)
    for m in models:
        m.update(gap_to_reference(m, ref))
        m["paper_loss"] = paper.get(m["suffix"])
    ranked = sorted((m for m in models if m["val_loss_mean"] is not None), key=lambda m: m["val_loss_mean"])
    return {"suite": name, "title": suite.title, "reference": ref["label"], "paper_note": suite.paper_note,
            "observed_order": " < ".join(m["label"] for m in ranked), "models": models}


def write_results(out: Path, recipe: dict[str, Any], suites: dict[str, tuple[Suite, dict[str, str]]],
                  at: dict[str, tuple[Path, dict[str, Any]]] | None = None,
                  extra: dict[str, Any] | None = None) -> dict:
    """results.json and results.md of OUT (`at`: see suite_results; `extra`: more keys for results.json)."""
    results = {"recipe": recipe, "suites": [suite_results(n, s, p, out, recipe, at) for n, (s, p) in suites.items()],
               **(extra or {})}
    write_json(out / RESULTS_JSON, results)
    (out / RESULTS_MD).write_text(table_markdown(results))
    return results


def write_plots(out: Path, results: dict[str, Any]) -> list[str]:
    """loss_curves.png (first suite) and loss_curves_<suite>.png for the others."""
    from . import plots

    files = []
    for i, suite in enumerate(results["suites"]):
        name = "loss_curves.png" if i == 0 else f"loss_curves_{suite['suite']}.png"
        curves = {m["label"]: [r["curve"] for r in m["runs"]] for m in suite["models"]}
        plots.loss_curves(curves, out / name, "training LM loss (nats/token)", suite["title"])
        files.append(name)
    return files


def analyze_finals(out: Path, results: dict[str, Any], recipe: dict[str, Any]) -> None:
    """Routing analysis (stats, Figs. 4-5, shared swap) of every routed model's seed-0 final checkpoint."""
    data_dir = Path(recipe["data"]) if recipe["data"] else Path(ensure_builtin_data())
    batches = validation_batches(data_dir, recipe["batch_size"], recipe["seq_len"], recipe["eval_batches"])
    labels: dict[str, str] = {}
    for s in results["suites"]:
        for m in s["models"]:
            labels.setdefault(m["preset"], m["label"])
    checkpoints = []
    for preset, label in labels.items():
        ckpt = final_checkpoint(run_dir_for(out, preset, 0), recipe["steps"])
        if ckpt is None:
            continue
        print(f"analyzing {preset} (seed 0)", file=sys.stderr, flush=True)
        model, ckpt = load_model(ckpt)
        checkpoints.append({"name": label, "checkpoint": str(ckpt),
                            **analyze_model(model, batches, token_decoder(ckpt, data_dir))})
    files = write_routing_plots(checkpoints, out / "analysis")
    write_json(out / "analysis" / ANALYSIS_JSON, {"data": str(data_dir), "seq_len": recipe["seq_len"],
                                                    "batches": len(batches), "checkpoints": checkpoints,
                                                    "plots": files})


def make_recipe(*, steps: int, seeds: int, batch_size: int, seq_len: int, eval_batches: int, data: str | None,
                scale: str, lr: float | None = None) -> dict[str, Any]:
    """The one recipe of a comparison: every model trains with it (schedule derived from the step count). `lr`
    is recorded only when given, so a recipe at the train config's default reads as before."""
    return {"steps": steps, "seeds": seeds, "batch_size": batch_size, "seq_len": seq_len,
            "eval_batches": eval_batches, "warmup_steps": max(1, min(50, steps // 10)),
            "save_every": max(1, steps // 10), "data": str(Path(data).resolve()) if data else None, "scale": scale,
            **({"lr": lr} if lr is not None else {})}
