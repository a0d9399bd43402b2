"""compare: suites, noise verdicts, run states, and a micro suite end to end (train, table, resume)."""

import json
import shutil

import pytest

from deepseekmoe.analysis import compare
from deepseekmoe.analysis.results import HEADERS, table_rows
from deepseekmoe.commands.compare import compare_command
from deepseekmoe.errors import UserError
from train_helpers import make_data_dir, read_metrics


def test_suites_resolve_to_matched_presets():
    suites = compare.resolve_suites("table1", "tiny", None)
    assert list(suites["table1"][1].values()) == ["tiny-dense", "tiny-hash", "tiny-switch", "tiny-gshard",
                                                  "tiny-deepseekmoe"]
    assert compare.resolve_suites("table1", "2b", None)["table1"][1]["deepseekmoe"] == "deepseekmoe-2b"
    assert set(compare.resolve_suites("all", "small", None)) == set(compare.SUITES)
    assert compare.resolve_suites("ablation", "tiny", ["tiny-dense", "tiny-gshard"])["custom"][0].reference \
        == "tiny-gshard"
    with pytest.raises(ValueError, match="unknown suite 'table9'"):
        compare.resolve_suites("table9", "tiny", None)
    with pytest.raises(UserError, match="huge-dense"):
        compare.resolve_suites("table1", "huge", None)


def _model(label, mean, std):
    return {"label": label, "val_loss_mean": mean, "val_loss_std": std}


def test_gap_is_judged_against_twice_the_pooled_seed_std():
    ref = _model("ref", 2.80, 0.10)
    real = compare.gap_to_reference(_model("a", 3.05, 0.10), ref)
    assert real["gap"] == pytest.approx(0.25) and real["noise"] == pytest.approx(0.2) and real["beyond_noise"]
    noise = compare.gap_to_reference(_model("b", 2.95, 0.10), ref)
    assert noise["beyond_noise"] is False
    # pooled std of 0.3 and 0.1 is sqrt(0.05): noise 2 * 0.2236
    assert compare.gap_to_reference(_model("c", 3.2, 0.3), ref)["noise"] == pytest.approx(2 * 0.05 ** 0.5)
    one_seed = compare.gap_to_reference(_model("d", 3.0, None), _model("ref", 2.8, None))
    assert one_seed == {"gap": pytest.approx(0.2), "noise": None, "beyond_noise": None}


def test_table_rows_say_which_gaps_exceed_noise():
    suite = {"reference": "R", "models": [
        {"label": "A", "total_params": 10_846_848, "active_params": 3_449_472, "flops_per_token": 15_971_328,
         "val_loss_mean": 3.05, "val_loss_std": 0.1, "val_bpb_mean": 1.2, "val_bpb_std": 0.01,
         "tokens_per_s": 2500.4, "gap": 0.25, "noise": 0.2, "beyond_noise": True, "paper_loss": 1.867},
        {"label": "B", "total_params": 1, "active_params": 1, "flops_per_token": 1, "val_loss_mean": 2.9,
         "val_loss_std": 0.1, "val_bpb_mean": None, "val_bpb_std": None, "tokens_per_s": None, "gap": 0.1,
         "noise": 0.2, "beyond_noise": False, "paper_loss": None},
        {"label": "R", "total_params": 1, "active_params": 1, "flops_per_token": 1, "val_loss_mean": 2.8,
         "val_loss_std": 0.1, "val_bpb_mean": None, "val_bpb_std": None, "tokens_per_s": None, "gap": 0.0,
         "noise": 0.2, "beyond_noise": False, "paper_loss": None}]}
    a, b, r = table_rows(suite)
    assert len(a) == len(HEADERS)
    assert a == ["A", "10.85M", "3.45M", "15.97M", "3.0500 ± 0.1000", "1.2000 ± 0.0100", "2,500", "+0.2500",
                 "yes", "1.867"]
    assert b[7:9] == ["+0.1000", "no (noise 0.2000)"] and r[7:9] == ["–", "reference"]


def _fake_run(run_dir, steps, checkpoint_step=None, final_val=True):
    ckpt = run_dir / "checkpoints" / f"step_{checkpoint_step or steps:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"")
    records = [{"kind": "train", "step": 1, "lm_loss": 5.0, "tokens_per_s": 100.0}]
    if final_val:
        records.append({"kind": "val", "step": steps, "val_loss": 4.0, "val_bpb": 1.5, "val_tokens": 64})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_run_states_and_resume_decisions(tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    _fake_run(compare.run_dir_for(out, "tiny-dense", 0), 4)
    _fake_run(compare.run_dir_for(out, "tiny-gshard", 0), 4, checkpoint_step=2, final_val=False)
    stale = compare.run_dir_for(out, "tiny-switch", 0)
    stale.mkdir(parents=True)
    (stale / "metrics.jsonl").write_text("")
    assert [compare.run_status(compare.run_dir_for(out, p, 0), 4) for p in ("tiny-dense", "tiny-gshard",
            "tiny-switch")] == ["done", "partial", "new"]
    calls = []
    monkeypatch.setattr(compare, "train_run", lambda p, s, d, r, resume: calls.append((p, s, resume)) or 0)
    jobs = [("tiny-dense", 0), ("tiny-gshard", 0), ("tiny-switch", 0)]
    assert compare.run_all(jobs, out, {"steps": 4})
    assert calls == [("tiny-gshard", 0, True), ("tiny-switch", 0, False)]
    assert not stale.exists()  # a run that never saved a checkpoint starts afresh
    monkeypatch.setattr(compare, "train_run", lambda *a, **k: 130)
    assert not compare.run_all([("tiny-hash", 0)], out, {"steps": 4})


def test_a_finished_run_kept_without_its_checkpoints_is_still_done(tmp_path):
    run = compare.run_dir_for(tmp_path, "tiny-dense", 0)
    _fake_run(run, 4)
    assert compare.final_checkpoint(run, 4) is not None
    for ckpt in (run / "checkpoints").iterdir():
        shutil.rmtree(ckpt)
    assert compare.run_status(run, 4) == "done" and compare.final_checkpoint(run, 4) is None


def test_a_changed_recipe_is_refused(tmp_path):
    recipe = {"steps": 2, "seeds": 1, "batch_size": 2}
    compare._record_recipe(tmp_path, recipe)
    compare.check_recipe(tmp_path, recipe)
    compare.check_recipe(tmp_path, {**recipe, "seeds": 3})  # more seeds only add runs
    with pytest.raises(UserError, match="different recipe .*steps=2"):
        compare.check_recipe(tmp_path, {**recipe, "steps": 5})


def test_a_learning_rate_is_part_of_the_recipe_only_when_given(tmp_path):
    """--lr reaches every run's TrainConfig; a recipe without it reads as before (the recorded suites resume),
    and a directory made at one learning rate refuses another, or the default, in either direction."""
    args = dict(steps=488, seeds=3, batch_size=8, seq_len=256, eval_batches=16, data=None, scale="tiny")
    default, searched = compare.make_recipe(**args), compare.make_recipe(**args, lr=8e-3)
    assert "lr" not in default and "lr" not in compare.recipe_settings(default, 0)
    assert searched == {**default, "lr": 8e-3} and compare.recipe_settings(searched, 1)["lr"] == 8e-3
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    compare._record_recipe(tmp_path / "a", default)
    compare._record_recipe(tmp_path / "b", searched)
    with pytest.raises(UserError, match="different recipe .*lr=None"):
        compare.check_recipe(tmp_path / "a", searched)
    with pytest.raises(UserError, match="different recipe .*lr=0.008"):
        compare.check_recipe(tmp_path / "b", default)
    compare.check_recipe(tmp_path / "b", {**searched, "seeds": 5})


def test_a_refused_command_leaves_no_recipe_behind(tmp_path, capsys):
    """A bad argument that the trainer refuses before writing anything leaves no recipe.json, so the corrected
    command (another recipe) is not refused as a different recipe."""
    from deepseekmoe.cli import main

    data = make_data_dir(tmp_path / "data")
    out = tmp_path / "cmp"
    args = ["compare", "--models", "tiny-dense", "--seeds", "1", "--steps", "2", "--data", str(data),
            "--out", str(out), "--no-analyze"]
    assert main([*args, "--seq-len", "100000"]) == 2  # beyond the model's context: refused before any write
    assert "deepseekmoe: error:" in capsys.readouterr().err
    assert not (out / compare.RECIPE_JSON).exists()
    compare.check_recipe(out, {"steps": 2, "seq_len": 32})  # the corrected recipe is accepted


@pytest.mark.slow
def test_micro_suite_writes_table_and_second_call_trains_nothing(tmp_path, monkeypatch):
    data = make_data_dir(tmp_path / "data")
    out = tmp_path / "cmp"
    kwargs = dict(models=["tiny-dense", "tiny-gshard"], steps=2, seeds=1, data=str(data), out=str(out),
                  batch_size=2, seq_len=32, eval_batches=2)
    assert compare_command(**kwargs) == 0
    results = json.loads((out / "results.json").read_text())
    (suite,) = results["suites"]
    assert [m["preset"] for m in suite["models"]] == ["tiny-dense", "tiny-gshard"]
    for m in suite["models"]:
        assert m["num_seeds"] == 1 and m["val_loss_mean"] > 0 and m["tokens_per_s"] > 0
        assert m["runs"][0]["steps"] == 2 and m["val_loss_std"] is None
    dense, gshard = suite["models"]
    assert dense["total_params"] == dense["active_params"] < gshard["active_params"] < gshard["total_params"]
    md = (out / "results.md").read_text()
    assert "| " + " | ".join(HEADERS) + " |" in md and "| tiny-dense |" in md and "n/a (1 seed)" in md
    assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    analysis = json.loads((out / "analysis" / "analysis.json").read_text())
    assert [c["name"] for c in analysis["checkpoints"]] == ["tiny-dense", "tiny-gshard"]
    assert len(analysis["checkpoints"][1]["disable_top"]) == 5
    before = (out / "runs" / "tiny-gshard" / "seed0" / "metrics.jsonl").read_text()
    monkeypatch.setattr(compare, "train_run", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert compare_command(**kwargs, analyze=False) == 0
    assert (out / "runs" / "tiny-gshard" / "seed0" / "metrics.jsonl").read_text() == before
    assert json.loads((out / "results.json").read_text())["suites"] == results["suites"]


@pytest.mark.slow
def test_runs_side_by_side_in_child_processes_give_the_bits_of_runs_in_process(tmp_path, monkeypatch):
    """--jobs 2 trains in child processes: the losses, training and validation, must be the run's in this process
    to the last bit."""
    data = make_data_dir(tmp_path / "data")
    kwargs = dict(models=["tiny-dense", "tiny-deepseekmoe"], steps=3, seeds=2, data=str(data), batch_size=2,
                  seq_len=32, eval_batches=1, analyze=False)
    assert compare_command(**kwargs, out=str(tmp_path / "one")) == 0
    assert compare_command(**kwargs, out=str(tmp_path / "two"), jobs=2) == 0
    for preset in ("tiny-dense", "tiny-deepseekmoe"):
        for seed in range(2):
            one, two = (read_metrics(tmp_path / d / "runs" / preset / f"seed{seed}", "train") for d in ("one", "two"))
            assert [r["loss"] for r in one] == [r["loss"] for r in two] and len(one) == 3
            assert (tmp_path / "two" / "logs" / f"{preset}-seed{seed}.log").read_text()  # the child's output
    one, two = (json.loads((tmp_path / d / "results.json").read_text())["suites"][0]["models"] for d in ("one", "two"))
    assert [m["val_loss_mean"] for m in one] == [m["val_loss_mean"] for m in two]
    monkeypatch.setattr(compare, "train_child", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert compare_command(**kwargs, out=str(tmp_path / "two"), jobs=2) == 0
    with pytest.raises(ValueError, match="--jobs must be at least 1"):
        compare_command(**kwargs, out=str(tmp_path / "three"), jobs=0)


def test_typed_recipe_settings_resolve_as_the_key_value_overrides_did(tmp_path):
    """A run's settings are passed typed; they resolve to the config the `train.KEY=VALUE` strings compare used to
    build gave (the strings as that code wrote them), so the runs already on disk resume with the same config."""
    from deepseekmoe.train.config import load_config
    from deepseekmoe.train.rundir import option_values

    recipe = compare.make_recipe(steps=488, seeds=3, batch_size=8, seq_len=256, eval_batches=16, data=None,
                                 scale="tiny")
    strings = ["train.seed=2", "train.batch_size=8", "train.seq_len=256", "train.warmup_steps=48",
               "train.eval_batches=16", "train.log_every=10", "train.eval_every=122", "train.save_every=48",
               "train.keep_last=1", "train.sample_tokens=0", "train.tensorboard=false"]
    run_dir = str(tmp_path / "runs" / "tiny-gshard" / "seed2")
    before = load_config(None, ["preset=tiny-gshard", f"out={run_dir}", "train.max_steps=488", *strings])
    options = option_values("tiny-gshard", None, run_dir, 488)
    typed = {**options, **{f"train.{k}": v for k, v in compare.recipe_settings(recipe, 2).items()}}
    after = load_config(options=typed)
    assert after == before and after.to_yaml() == before.to_yaml()
    (tmp_path / "config.yaml").write_text(before.to_yaml())  # --resume: the run's own config is the base
    assert load_config(base=tmp_path / "config.yaml", options=typed) == before


def test_the_recorded_scaling_suite_resumes_with_its_recipes(tmp_path, monkeypatch):
    """docs/results/scaling-tiny (the small files of every finished run) copied and resumed with the command that
    made it: every lr directory's recipe is the budget's, and each complete budget's search, run again on the
    recorded runs, trains nothing and ends at the recorded best lr of every model."""
    from pathlib import Path

    from deepseekmoe.analysis.lr_search import Budget, lr_dir
    from deepseekmoe.analysis.scaling import budget_recipes, parse_budgets

    out = tmp_path / "scaling-tiny"
    shutil.copytree(Path(__file__).parents[1] / "docs" / "results" / "scaling-tiny", out)
    plan = budget_recipes(parse_budgets("0.5M,1M,2M"), scale="tiny", seeds=3, batch_size=8, seq_len=256,
                          eval_batches=16, data=None)
    suite = compare.SUITES["table1"]
    presets = {sfx: f"tiny-{sfx}" for _, sfx in suite.models}
    monkeypatch.setattr(compare, "train_run", lambda *a, **k: pytest.fail("a finished run was trained again"))
    starts, complete = {sfx: 4e-3 for sfx in presets}, 0
    for _, name, recipe in plan:
        budget = Budget(out / name, suite, presets, recipe)
        budget.check()
        results = out / name / "results.json"
        models = json.loads(results.read_text())["suites"][0]["models"] if results.is_file() else []
        if not models or not all(m["num_seeds"] == 3 for m in models):
            break  # the budget still training when the results were recorded
        finished, best, tried = budget.run(starts, search=True)
        assert finished and best == {m["suffix"]: m["lr"] for m in models}
        budget.write_results(dict(reversed(best.items())), dict(reversed(tried.items())))  # searches ending in
        written = json.loads(results.read_text())  # another order (two workers) write the suite's order
        assert list(written["lr_search"]) == list(written["best_lr"]) == list(presets)
        for sfx, lr in best.items():
            assert all(compare.run_status(compare.run_dir_for(lr_dir(out / name, lr), presets[sfx], s),
                                          recipe["steps"]) == "done" for s in range(3))
        starts, complete = best, complete + 1
    assert complete >= 2  # 0.5M and 1M
    with pytest.raises(UserError, match="different recipe"):
        Budget(out / plan[0][1], suite, presets, {**plan[0][2], "batch_size": 4}).check()
