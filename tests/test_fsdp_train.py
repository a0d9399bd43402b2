"""`deepseekmoe train --fsdp` end to end: the real CLI under torchrun (gloo, 2 and 4 CPU processes) against one
process, sharded checkpoints resumed at other world sizes and (dp, ep) splits, and `convert --from-sharded`.

Tolerance: fp32 reduction order (FSDP2's reduce-scatter and the all-reduces sum in another order than one process's
backward); the losses agree to ~1e-7 relative, asserted at 1e-5 as in test_distributed.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from deepseekmoe.checkpoint import is_sharded, list_checkpoints, read_safetensors, save_model
from deepseekmoe.cli import main as cli_main
from deepseekmoe.config import ModelConfig
from deepseekmoe.distributed.mesh import Parallel
from deepseekmoe.distributed.plan import check_options
from deepseekmoe.filenames import CONFIG_FILE, MODEL_FILE, TRAINER_STATE_FILE
from deepseekmoe.model import Transformer
from deepseekmoe.train.config import TrainConfig
from deepseekmoe.train.optim import param_groups
from deepseekmoe.train.sharded_checkpoint import load_sharded, read_extra, single_to_sharded
from train_helpers import make_data_dir, read_metrics, tiny_overrides

REL = 1e-5
CUT = "step_00000003"
ARGS = [*tiny_overrides(max_steps=5, save_every=3), "model.device_aux_loss_alpha=0.05"]


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


def _torchrun(nproc: int, args: list[str], cwd: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "deepseekmoe", "train", *args]
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _cut(run_dir: Path, copy: Path) -> Path:
    """A copy of the run stopped after its step-3 checkpoint."""
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000005")
    return copy


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One process (n_device_groups=2: what --ep 2 resolves), then --fsdp --ep 2 on 2 and on 4 processes."""
    tmp = tmp_path_factory.mktemp("fsdp_train")
    data = make_data_dir(tmp / "data")
    assert cli_main(["train", *ARGS, "model.n_device_groups=2", "--data", str(data), "--out",
                     str(tmp / "one")]) == 0
    for n in (2, 4):
        _torchrun(n, [*ARGS, "--data", str(data), "--fsdp", "--ep", "2", "--out", str(tmp / f"fsdp{n}")], tmp)
    return {"tmp": tmp, "data": data, "one": _losses(tmp / "one")}


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
def test_train_fsdp_ep2_matches_one_process(runs, n):
    run = runs["tmp"] / f"fsdp{n}"
    assert runs["one"][0] != runs["one"][-1]  # it trained
    assert _losses(run) == pytest.approx(runs["one"], rel=REL)
    ckpts = list_checkpoints(run)
    assert [p.name for p in ckpts] == [CUT, "step_00000005"] and all(map(is_sharded, ckpts))
    assert len(list((ckpts[-1] / "dcp").glob("*.distcp"))) == n  # every rank wrote its own shards
    assert not (ckpts[-1] / MODEL_FILE).exists()  # no gathered copy


@pytest.mark.slow
def test_resume_at_other_world_sizes_repeats_the_run(runs):
    """2 processes (1 x 2) -> 4 (1 x 4); 4 processes (2 x 2) -> one process, in-process."""
    tmp = runs["tmp"]
    a = _cut(tmp / "fsdp2", tmp / "fsdp2_to_4")
    _torchrun(4, ["--resume", "--ep", "4", "--out", str(a)], tmp)
    b = _cut(tmp / "fsdp4", tmp / "fsdp4_to_1")
    assert cli_main(["train", "--resume", "--out", str(b)]) == 0
    for run in (a, b):
        assert _losses(run) == pytest.approx(runs["one"], rel=REL)
        assert is_sharded(list_checkpoints(run)[-1])  # train.fsdp came from the run's config


@pytest.mark.slow
def test_converted_checkpoint_is_the_gathered_state_and_resumes(runs, capsys):
    tmp = runs["tmp"]
    sharded = tmp / "fsdp4" / "checkpoints" / CUT
    single = tmp / "single"
    assert cli_main(["convert", "--from-sharded", str(sharded), "--out", str(single)]) == 0
    torch.manual_seed(1)
    model = Transformer(ModelConfig.from_dict(json.loads((sharded / CONFIG_FILE).read_text())))
    opt = torch.optim.AdamW(param_groups(model, 0.1))
    load_sharded(sharded, model, opt, Parallel(None, 1, 1, 0, torch.device("cpu")))  # DCP's own resharding
    weights = read_safetensors(single / MODEL_FILE)
    for name, tensor in model.state_dict().items():
        assert torch.equal(weights[name], tensor), name
    state = torch.load(single / TRAINER_STATE_FILE, weights_only=True)
    assert state["progress"]["step"] == 3 and state["scheduler"] == read_extra(sharded)["scheduler"]
    positions = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(positions):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state["optimizer"]["state"][i][key], opt.state[p][key])
    # the single-file checkpoint in place of the sharded one: a run without --fsdp continues from it
    run = _cut(tmp / "fsdp4", tmp / "from_single")
    shutil.rmtree(run / "checkpoints" / CUT)
    shutil.copytree(single, run / "checkpoints" / CUT)
    assert cli_main(["train", "--resume", "--no-fsdp", "--out", str(run)]) == 0
    assert _losses(run) == pytest.approx(runs["one"], rel=REL)
    capsys.readouterr()
    assert cli_main(["eval", str(single), "--data", str(runs["data"]), "--max-batches", "1", "--json"]) == 0
    assert "bits_per_byte" in capsys.readouterr().out


# ------------------------------------------------------------------ one process: fast
def test_one_process_fsdp_is_bit_identical_and_writes_sharded(tmp_path, capsys):
    data = make_data_dir(tmp_path / "data")
    base = [*tiny_overrides(max_steps=4, save_every=2), "--data", str(data)]
    assert cli_main(["train", *base, "--out", str(tmp_path / "plain")]) == 0
    assert cli_main(["train", *base, "--fsdp", "--out", str(tmp_path / "fsdp")]) == 0
    assert _losses(tmp_path / "fsdp") == _losses(tmp_path / "plain")
    ckpt = list_checkpoints(tmp_path / "fsdp")[-1]
    assert is_sharded(ckpt)
    shutil.rmtree(ckpt)
    assert cli_main(["train", "--resume", "--out", str(tmp_path / "fsdp")]) == 0
    assert _losses(tmp_path / "fsdp") == _losses(tmp_path / "plain")
    capsys.readouterr()
    for argv in (["eval", str(tmp_path / "fsdp")], ["generate", str(tmp_path / "fsdp"), "--prompt", "hi"],
                 ["convert", "--to-hf", str(tmp_path / "fsdp"), "--out", str(tmp_path / "hf")]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is a sharded checkpoint (train --fsdp); convert it first: deepseekmoe " \
            f"convert --from-sharded {ckpt} --out CHECKPOINT" in err[0], err
    assert not (tmp_path / "hf").exists()
    assert cli_main(["train", *base, "--fsdp", "train.keep_last=1", "--out", str(tmp_path / "kept")]) == 0
    assert [p.name for p in (tmp_path / "kept" / "checkpoints").iterdir()] == ["step_00000004"]  # pruned


def test_conversion_errors_are_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    save_model(Transformer(tiny_config()), tmp_path / "single")
    single_to_sharded(tmp_path / "single", tmp_path / "sharded")
    cases = [(["convert", "--from-sharded", str(tmp_path / "single"), "--out", str(tmp_path / "x")],
              "is a single-file checkpoint, not a sharded one"),
             (["convert", "--from-sharded", str(tmp_path / "sharded"), "--quantize", "int8", "--out",
               str(tmp_path / "x")], "--quantize takes --from-hf or --from-checkpoint"),
             (["convert", "--to-sharded", str(tmp_path / "sharded"), "--out", str(tmp_path / "x")],
              "is a sharded checkpoint")]
    for argv, message in cases:
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x").exists()


def test_activation_checkpointing_on_several_processes_needs_fsdp():
    with pytest.raises(ValueError, match=r"train.activation_checkpointing=true on 2 processes needs train.fsdp"):
        check_options(TrainConfig(activation_checkpointing=True), 2)
    check_options(TrainConfig(activation_checkpointing=True, fsdp=True), 2)
    check_options(TrainConfig(activation_checkpointing=True), 1)
