"""`deepseekmoe compare`: train a comparison suite (analysis/compare.py) or the scaling suite (scaling.py)."""

from __future__ import annotations

from typing import Any

from ..analysis.compare import (DEFAULT_STEPS, analyze_finals, check_recipe, make_recipe, resolve_suites, run_all,
                                write_plots, write_results)
from ..analysis.results import RESULTS_MD
from ..analysis.scaling import DEFAULT_BUDGETS, parse_budgets, run_scaling_suite
from ..errors import UserValueError
from ..fileio import check_output_dir


def _scaling(suite: str, out: str, budgets: str | None, steps: int | None, models: list[str] | None, scale: str,
             lr_search: bool, jobs: int, common: dict[str, Any]) -> int:
    if suite != "scaling":
        raise UserValueError("--budgets applies to --suite scaling only")
    if steps is not None or models:
        raise UserValueError("--steps and --models do not apply to --suite scaling: --budgets sets the steps")
    return run_scaling_suite(check_output_dir(out), parse_budgets(budgets or DEFAULT_BUDGETS), scale,
                             lr_search=lr_search, workers=jobs, **common)


def compare_command(*, suite: str = "table1", data: str | None = None, steps: int | None = None, seeds: int = 2,
                    scale: str = "tiny", out: str = "compare", models: list[str] | None = None,
                    batch_size: int = 8, seq_len: int = 256, eval_batches: int = 16,
                    analyze: bool = True, budgets: str | None = None, lr: float | None = None,
                    lr_search: bool = False, jobs: int = 1) -> int:
    """Train the paper's comparison suites with one recipe and write results.json, results.md, loss_curves.png.

    Each model of the suite is trained on the same data with the same recipe, seeds and token budget; the table
    gives parameters, FLOPs, final validation loss (mean ± std over seeds), bits per byte, throughput, and whether
    each gap to the reference exceeds 2x the seed noise. Interrupted suites resume: run the same command again.
    The default (table1, tiny, 400 steps of 8 x 256 tokens, 2 seeds) takes about 40 minutes on 2 CPU cores.

    Args:
        suite: table1 (Dense, Hash, Switch, GShard, DeepSeekMoE), ablation (Fig. 3), shared-ratio, upper-bound
            (Table 2: GShard x1.5, Dense x16), all (those four), or scaling (table1 at every --budgets; see
            deepseekmoe/analysis/scaling.py).
        data: prepared data directory (default: the built-in corpus).
        steps: optimizer steps per run (default: 400; small scale is about 10x slower per step than tiny).
        seeds: runs per model, seeds 0..N-1 (two or more to judge gaps against seed noise).
        scale: model family: tiny (~11M, CPU), small (~120M), 2b (the paper's size).
        out: output directory (reused to resume).
        models: explicit presets to compare instead of a suite (the last one is the reference).
        batch_size: sequences per step.
        seq_len: tokens per sequence.
        eval_batches: validation batches (fixed windows) for the final loss.
        analyze: also run the routing analysis on seed 0's final checkpoints (not for scaling).
        budgets: scaling: training tokens per run, comma-separated (default 0.5M,1M,2M,4M,8M); each budget is
            its own full run with its own schedule, in OUT/budget_<tokens>/.
        lr: peak learning rate of every run (default: the train config's, 4e-3); with --lr-search, where the
            search starts.
        lr_search: scaling: search each model's peak learning rate at every budget by factors of 2 (seed 0),
            the same rule for every model, and train the other seeds at each model's best
            (deepseekmoe/analysis/lr_search.py); without it every model trains at --lr.
        jobs: runs trained at a time, each in a child process with this one's environment (the same bits as
            one at a time); with OMP_NUM_THREADS=1, one run per core.
    """
    for name, value in {"seeds": seeds, "steps": steps, "batch-size": batch_size, "seq-len": seq_len,
                        "eval-batches": eval_batches, "jobs": jobs}.items():
        if value is not None and value < 1:
            raise UserValueError(f"--{name} must be at least 1, got {value}")
    if lr is not None and not lr > 0:
        raise UserValueError(f"--lr must be positive, got {lr}")
    common = {"seeds": seeds, "batch_size": batch_size, "seq_len": seq_len, "eval_batches": eval_batches,
              "data": data, "lr": lr}
    if suite == "scaling" or budgets is not None:
        return _scaling(suite, out, budgets, steps, models, scale, lr_search, jobs, common)
    if lr_search:
        raise UserValueError("--lr-search applies to --suite scaling only; for another suite run one --out per --lr")
    suites = resolve_suites(suite, scale, models)
    recipe = make_recipe(steps=steps or DEFAULT_STEPS.get(scale, 300), scale=scale, **common)
    out_dir = check_output_dir(out)
    check_recipe(out_dir, recipe)
    runs = list(dict.fromkeys((p, s) for _, presets in suites.values() for p in presets.values()
                              for s in range(seeds)))
    finished = run_all(runs, out_dir, recipe, workers=jobs)
    results = write_results(out_dir, recipe, suites)
    write_plots(out_dir, results)
    if not finished:
        return 130
    if analyze:
        analyze_finals(out_dir, results, recipe)
    print((out_dir / RESULTS_MD).read_text())
    return 0
