"""compare --suite scaling: budgets, claim verdicts, gap trends, and a micro suite end to end (train, summary,
routing health, resume)."""

import json
import math
import shutil

import pytest

from deepseekmoe.analysis import compare, lr_search, scaling
from deepseekmoe.cli import main
from deepseekmoe.data.dataset import read_meta
from train_helpers import make_data_dir, read_metrics


def test_budgets_parse_to_sorted_token_counts():
    assert scaling.parse_budgets("2M, 500K,0.5M,1m") == [500_000, 1_000_000, 2_000_000]
    assert scaling.parse_budgets("4096") == [4096]
    for bad in ("", "1X", "-1M", "0", "M"):
        with pytest.raises(ValueError, match="--budgets"):
            scaling.parse_budgets(bad)
    assert [scaling.budget_label(t) for t in (500_000, 16_000_000, 1_500_000_000, 64)] == ["500K", "16M", "1.5B",
                                                                                            "64"]
    assert scaling.budget_label(1_152_770) == "1.15277M"  # a budget's directory name keeps every digit
    assert scaling.budget_label(1_152_770, digits=3) == "1.15M"  # an extrapolated budget is rounded


def test_each_budget_gets_its_own_steps_and_schedule():
    plan = scaling.budget_recipes([2048, 65536], seeds=3, batch_size=2, seq_len=32, eval_batches=2, data=None,
                                  scale="tiny")
    (t1, d1, r1), (t2, d2, r2) = plan
    assert (d1.name, r1["steps"], r1["warmup_steps"], r1["save_every"]) == ("budget_2.048K", 32, 3, 3)
    assert (d2.name, r2["steps"], r2["warmup_steps"], r2["save_every"]) == ("budget_65.536K", 1024, 50, 102)


def test_lr_labels_name_directories():
    assert [scaling.lr_label(v) for v in (4e-3, 0.004 / 8, 2.5e-3, 1e-2, 3e-4 * 2)] == ["4e-3", "5e-4", "2.5e-3",
                                                                                         "1e-2", "6e-4"]


def test_bracket_moves_by_factors_until_both_neighbours_are_worse():
    calls = []

    def loss_at(lr):  # a bowl in log2(lr) with its bottom at 2**-10 (about 9.8e-4)
        calls.append(lr)
        return (math.log2(lr) + 10) ** 2

    best, tried = lr_search.bracket(2**-8, loss_at)
    assert best == 2**-10 and calls == [2**-8, 2**-9, 2**-7, 2**-10, 2**-11]
    assert tried == {lr: (math.log2(lr) + 10) ** 2 for lr in calls}
    calls.clear()  # a best at the start costs its two neighbours only
    assert lr_search.bracket(2**-10, loss_at)[0] == 2**-10 and calls == [2**-10, 2**-11, 2**-9]
    # a diverged run (nan) is worse than any other; an interrupted one (None) stops the search
    assert lr_search.bracket(1.0, lambda lr: {1.0: 5.0, 0.5: 6.0, 2.0: math.nan}[lr]) == (
        1.0, {1.0: 5.0, 0.5: 6.0, 2.0: pytest.approx(math.nan, nan_ok=True)})
    assert lr_search.bracket(1.0, lambda lr: None if lr == 0.5 else 3.0) == (None, {1.0: 3.0})
    # a loss that keeps falling stops after MAX_TRIES learning rates
    best, tried = lr_search.bracket(1.0, lambda lr: lr)
    assert len(tried) == lr_search.MAX_TRIES and best == min(tried)


def _m(mean, std):
    return {"loss_mean": mean, "loss_std": std}


def test_a_claim_holds_only_beyond_twice_the_pooled_noise():
    assert scaling.judge(_m(3.0, 0.1), _m(3.3, 0.1)) == {"gap": pytest.approx(-0.3), "noise": pytest.approx(0.2),
                                                         "verdict": "holds"}
    assert scaling.judge(_m(3.0, 0.1), _m(3.1, 0.1))["verdict"] == "within noise"
    assert scaling.judge(_m(3.4, 0.1), _m(3.1, 0.1))["verdict"] == "reversed"
    assert scaling.judge(_m(3.0, None), _m(3.3, None))["verdict"] == "n/a (1 seed)"
    assert scaling.judge(_m(None, None), _m(3.3, 0.1))["verdict"] == "no data"


def test_trend_is_a_least_squares_line_in_log2_tokens_and_gives_the_crossing():
    # gap of the first claim: +0.3 at 1M, +0.2 at 2M, +0.1 at 4M: -0.1 per doubling, zero at 8M
    rows = [{"tokens": t, "claims": [{"better": a, "worse": b, "gap": g if (a, b) == scaling.CLAIMS[0] else None}
                                     for a, b in scaling.CLAIMS]}
            for t, g in ((2**20, 0.3), (2**21, 0.2), (2**22, 0.1))]
    first, *rest = scaling.trends(rows)
    assert first["slope_per_doubling"] == pytest.approx(-0.1)
    assert first["crossing_tokens"] == pytest.approx(2**23)
    assert all(t["slope_per_doubling"] is None for t in rest)


@pytest.mark.slow
def test_micro_scaling_suite_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
    data = make_data_dir(tmp_path / "data")
    out = tmp_path / "scaling"
    argv = ["compare", "--suite", "scaling", "--budgets", "128,256", "--seeds", "2", "--data", str(data),
            "--out", str(out), "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1"]
    written = []  # the summary is rewritten after every budget, so an interrupted suite leaves the budgets done
    real_write = scaling.write_summary
    monkeypatch.setattr(scaling, "write_summary", lambda o, s: (written.append([b["label"] for b in s["budgets"]]),
                                                                real_write(o, s)))
    assert main(argv) == 0
    assert written == [["128"], ["128", "256"]]
    summary = json.loads((out / "scaling.json").read_text())
    assert [(b["label"], b["steps"]) for b in summary["budgets"]] == [("128", 2), ("256", 4)]
    windows = read_meta(data)["splits"]["train"]["tokens"] // 33  # samples of seq_len + 1 tokens per epoch
    assert [b["epochs"] for b in summary["budgets"]] == [pytest.approx(2 * 2 / windows), pytest.approx(4 * 2 / windows)]
    for budget in summary["budgets"]:
        assert list(budget["models"]) == ["dense", "hash", "switch", "gshard", "deepseekmoe"]
        assert [(c["better"], c["worse"]) for c in budget["claims"]] == list(scaling.CLAIMS)
        for sfx, m in budget["models"].items():
            assert m["lr"] == 4e-3  # no search: every model at the train config's peak lr
            finals = [read_metrics(out / f"budget_{budget['label']}" / "lr_4e-3" / "runs" / m["preset"] / f"seed{s}",
                                   "val")[-1] for s in range(2)]
            losses = [f["val_loss"] for f in finals]
            assert m["seeds"] == 2 and m["loss_mean"] == pytest.approx(sum(losses) / 2)
            assert m["loss_std"] == pytest.approx(abs(losses[0] - losses[1]) / math.sqrt(2))
        models = budget["models"]
        assert models["dense"]["gate_mass"] is None  # no routing at all
        assert models["hash"]["gate_mass"] == 1.0 and models["hash"]["token_entropy_normalized"] is None
        for sfx in ("switch", "gshard", "deepseekmoe"):  # raw softmax gates: a share of the MoE output below 1
            assert 0 < models[sfx]["gate_mass"] < 1 and 0 < models[sfx]["token_entropy_normalized"] <= 1
        gap = models["deepseekmoe"]["loss_mean"] - models["gshard"]["loss_mean"]
        assert budget["claims"][0]["gap"] == pytest.approx(gap)
    assert (out / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "scaling.md").read_text()
    assert f"| 128 | 2 | {4 / windows:.2f} |" in md and "DeepSeekMoE < GShard" in md and "per doubling" in md
    assert json.loads((out / "budget_256" / "results.json").read_text())["recipe"]["steps"] == 4
    assert json.loads((out / "budget_256" / "lr_4e-3" / "recipe.json").read_text())["lr"] == 4e-3
    assert "Peak learning rate, searched" not in md

    monkeypatch.setattr(compare, "train_run", lambda *a, **k: pytest.fail("a finished run was trained again"))
    capsys.readouterr()
    assert main(argv) == 0
    assert json.loads((out / "scaling.json").read_text()) == summary
    for checkpoints in out.glob("budget_*/lr_*/runs/*/seed*/checkpoints"):  # keep only the small files, as in docs/
        shutil.rmtree(checkpoints)
    assert main(argv) == 0
    assert json.loads((out / "scaling.json").read_text()) == summary  # routing health was cached


@pytest.mark.slow
def test_micro_lr_search_trains_each_model_at_its_own_best_and_resumes(tmp_path, monkeypatch, capsys):
    data = make_data_dir(tmp_path / "data")
    out = tmp_path / "scaling"
    argv = ["compare", "--suite", "scaling", "--budgets", "128", "--seeds", "2", "--data", str(data), "--out",
            str(out), "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--lr-search", "--lr", "0.05"]
    assert main(argv) == 0
    budget = out / "budget_128"
    results = json.loads((budget / "results.json").read_text())
    summary = json.loads((out / "scaling.json").read_text())
    row = summary["budgets"][0]
    for m in results["suites"][0]["models"]:
        sfx, best = m["suffix"], m["lr"]
        tried = {float(lr): loss for lr, loss in results["lr_search"][sfx].items()}
        assert results["best_lr"][sfx] == scaling.lr_label(best) and tried[best] == min(tried.values())
        assert best / 2 in tried and best * 2 in tried  # bracketed on both sides (well within MAX_TRIES here)
        for lr, loss in tried.items():  # seed 0 at every lr tried, in that lr's own directory and recipe
            lr_dir = budget / f"lr_{scaling.lr_label(lr)}"
            assert json.loads((lr_dir / "recipe.json").read_text())["lr"] == lr
            assert read_metrics(lr_dir / "runs" / m["preset"] / "seed0", "val")[-1]["val_loss"] == loss
            assert (lr_dir / "runs" / m["preset"] / "seed1").exists() == (lr == best)  # other seeds at the best
        finals = [read_metrics(budget / f"lr_{scaling.lr_label(best)}" / "runs" / m["preset"] / f"seed{s}",
                               "val")[-1]["val_loss"] for s in range(2)]
        assert m["val_loss_mean"] == pytest.approx(sum(finals) / 2) and row["models"][sfx]["lr"] == best
    md = (out / "scaling.md").read_text()
    assert "Peak learning rate, searched alike" in md and "(lr " in md
    monkeypatch.setattr(compare, "train_run", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert main(argv) == 0  # the search reads its finished runs and takes the same path
    assert json.loads((out / "scaling.json").read_text()) == summary
    assert main([*argv, "--eval-batches", "2"]) == 2  # another recipe in the same OUT: refused
    assert "different recipe" in capsys.readouterr().err
