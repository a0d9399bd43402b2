"""The peak learning rate of every model at one budget of the scaling suite, searched alike for every model.

One budget of `compare --suite scaling` keeps one `compare` directory per learning rate tried:

    budget_<tokens>/lr_<lr>/      recipe.json (the budget's recipe with that peak lr), runs/<preset>/seed<k>/,
                                  results.json / results.md (every model that has runs at that lr)
    budget_<tokens>/results.json  each model at its own peak lr (seeds 0..S-1 there), and the search's losses

With the search on, each model's seed 0 is trained at the starting lr and at the lr a factor `LR_FACTOR` below and
above it; while a neighbour is better the search moves there and tries that one's other neighbour, until the
best lr tried has a worse (or untried beyond `MAX_TRIES`) neighbour on each side. The other seeds are then trained
at each model's best. The rule is the same for every model: nothing is tuned for one of them. With the search off
every model trains at the one starting lr. The starting lr of a budget is the model's best at the budget before it
in the same call (the first budget: --lr, else the train config's 4e-3), since the best lr moves slowly with the
budget. Runs resume like any `compare` run, and a search that is run again reads the runs it finished instead of
training them: the same runs give the same losses, so it takes the same path. The rule is local: where seed noise
makes the loss anything but a bowl in the lr, it can stop at a best whose neighbours are worse while a rate further
away, untried, would be better still.
"""

from __future__ import annotations

import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from .compare import RECIPE_JSON, Suite, check_recipe, run_dir_for, run_one, write_results
from .results import lr_label, read_run

LR_FACTOR = 2.0
MAX_TRIES = 8
"""Learning rates tried per model and budget at most (a loss that keeps falling at the edge stops there)."""


def lr_dir(budget_dir: Path, lr: float) -> Path:
    return budget_dir / f"lr_{lr_label(lr)}"


def bracket(start: float, loss_at: Callable[[float], float | None], factor: float = LR_FACTOR,
            max_tries: int = MAX_TRIES) -> tuple[float | None, dict[float, float]]:
    """(best lr, {lr: loss} of every lr tried) from `start` by factors of `factor` (see the module docstring);
    best is None when `loss_at` returned None (the run was interrupted). A loss that is not a number (a diverged
    run) counts as worse than any other."""
    tried: dict[float, float] = {}

    def key(lr: float) -> float:
        return tried[lr] if math.isfinite(tried[lr]) else math.inf

    best = start
    while True:
        for lr in (best, best / factor, best * factor):
            if lr in tried or len(tried) >= max_tries:
                continue
            loss = loss_at(lr)
            if loss is None:
                return None, tried
            tried[lr] = loss
        new = min(tried, key=key)
        if new == best:
            return best, tried
        best = new


class Budget:
    """One budget's runs: the table1 models, their recipe at any lr, and where each run lives. `workers` > 1
    trains that many runs at a time in child processes (compare.train_child): the models' searches side by side,
    then their other seeds."""

    def __init__(self, budget_dir: Path, suite: Suite, presets: dict[str, str], recipe: dict[str, Any],
                 workers: int = 1) -> None:
        self.dir, self.suite, self.presets, self.base = budget_dir, suite, presets, recipe
        self.workers = workers
        self._lock = threading.Lock()

    def recipe(self, lr: float) -> dict[str, Any]:
        return {**self.base, "lr": lr}

    def check(self) -> None:
        """Refuse a budget whose existing lr directories were made with another recipe (before any training)."""
        for path in sorted(self.dir.glob(f"lr_*/{RECIPE_JSON}")):
            check_recipe(path.parent, self.recipe(json.loads(path.read_text())["lr"]))

    def train(self, sfx: str, seed: int, lr: float) -> float | None:
        """Train (or resume, or skip when finished) one run; its final validation loss, None when interrupted."""
        out, preset = lr_dir(self.dir, lr), self.presets[sfx]
        head = f"{self.dir.name}: {preset} seed {seed} at peak lr {lr_label(lr)}"
        finished = run_one(preset, seed, out, self.recipe(lr), head, child=self.workers > 1)
        with self._lock:  # this lr's table; two workers may train at the same lr
            if out.is_dir():
                write_results(out, self.recipe(lr), {"table1": (self.suite, self.presets)})
        return read_run(run_dir_for(out, preset, seed))["val_loss"] if finished else None

    def run(self, starts: dict[str, float], search: bool) -> tuple[bool, dict[str, float], dict[str, dict]]:
        """(finished, {suffix: best lr}, {suffix: {lr: seed-0 loss}}): seed 0 of every model (searched or at its
        start), then seeds 1..S-1 at each model's best; the results files are rewritten as runs finish."""
        best: dict[str, float] = {}
        tried: dict[str, dict[float, float]] = {}

        def first(sfx: str) -> bool:
            if search:
                lr, t = bracket(starts[sfx], lambda lr: self.train(sfx, 0, lr))
            else:
                loss = self.train(sfx, 0, starts[sfx])
                lr, t = (None, {}) if loss is None else (starts[sfx], {starts[sfx]: loss})
            with self._lock:
                tried[sfx] = t
                if lr is not None:
                    best[sfx] = lr
                self.write_results(best, tried)
            return lr is not None

        def other(job: tuple[str, int]) -> bool:
            sfx, seed = job
            finished = self.train(sfx, seed, best[sfx]) is not None
            with self._lock:
                self.write_results(best, tried)
            return finished

        models = [sfx for _, sfx in self.suite.models]
        seeds = [(sfx, seed) for seed in range(1, self.base["seeds"]) for sfx in models]
        finished = self._each(first, models) and self._each(other, seeds)
        return finished, best, tried

    def _each(self, fn: Callable[[Any], bool], items: list[Any]) -> bool:
        """fn over items, `workers` at a time; stops at the first False when one at a time."""
        if self.workers == 1:
            return all(fn(item) for item in items)
        with ThreadPoolExecutor(self.workers) as pool:
            return all(list(pool.map(fn, items)))

    def write_results(self, best: dict[str, float], tried: dict[str, dict[float, float]]) -> None:
        """The budget's table: every model at its best lr so far (each lr's own table: `train`)."""
        order = [sfx for _, sfx in self.suite.models]  # the suite's order, not the order the searches ended in
        at = {sfx: (lr_dir(self.dir, best[sfx]), self.recipe(best[sfx])) for sfx in order if sfx in best}
        search = {sfx: {lr_label(lr): loss for lr, loss in sorted(tried[sfx].items())} for sfx in order
                  if sfx in tried}
        write_results(self.dir, self.base, {"table1": (self.suite, self.presets)}, at=at,
                      extra={"lr_search": search, "best_lr": {sfx: lr_label(best[sfx]) for sfx in order
                                                              if sfx in best}})
