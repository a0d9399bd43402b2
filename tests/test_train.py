"""The trainer: config overrides, exact resume, Ctrl-C, non-finite losses, gradient accumulation, run directory
contents and bad-input errors. Every run is a tiny DeepSeekMoE (d=32, 2 layers, 8 experts, seq 32) on CPU."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from deepseekmoe import Transformer
from deepseekmoe.cli import main
from deepseekmoe.losses import LossParts
from deepseekmoe.train import trainer as trainer_module
from deepseekmoe.checkpoint import list_checkpoints
from deepseekmoe.convert.load import load_model
from deepseekmoe.errors import UserError
from deepseekmoe.configio import from_text
from deepseekmoe.train.config import TrainConfig, load_config
from deepseekmoe.train.state import load_training_state
from deepseekmoe.train.trainer import forward_backward, optimizer_step
from train_helpers import make_data_dir, read_metrics, tiny_overrides


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("data"))


def train(data: Path, out: Path, *extra: str, resume: bool = False, **train_kw: object) -> int:
    args = ["train", *tiny_overrides(**train_kw), *extra, "--data", str(data), "--out", str(out)]
    return main(args + (["--resume"] if resume else []))


def losses(run_dir: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir)]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_model(run_dir)[0].state_dict()


def on_call(n: int, action):
    """A total_loss wrapper that runs `action(parts)` on its n-th call (1-based) and every later one if n < 0."""
    real = trainer_module.total_loss
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        parts = real(*args, **kwargs)
        if calls["n"] == n or (n < 0 and calls["n"] >= -n):
            parts = action(parts) or parts
        return parts
    return wrapper


def nan_parts(parts: LossParts) -> LossParts:
    nan = parts.total * float("nan")
    return LossParts(nan, parts.lm * float("nan"), parts.expert_balance, parts.device_balance, parts.z)


# ------------------------------------------------------------------------------------------------ config
def test_overrides_are_typed_and_layered(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("preset: tiny-gshard\nout: runs/x\ntrain:\n  lr: 1e-3\n  max_steps: 50\n"
                      "model:\n  hidden_size: 64\n")
    run = load_config(recipe, ["train.max_steps=7", "model.num_attention_heads=2", "train.schedule=cosine",
                               "train.step_decay_at=[0.5, 0.75]", "train.tensorboard=false",
                               "train.peak_flops=null", "model.capacity_factor=1.25"])
    assert run.preset == "tiny-gshard" and run.model.router == "gshard" and run.out == "runs/x"
    assert run.train.lr == 1e-3 and isinstance(run.train.lr, float)  # YAML reads 1e-3 as a string
    assert run.train.max_steps == 7 and run.train.schedule == "cosine"
    assert run.train.step_decay_at == [0.5, 0.75] and run.train.tensorboard is False
    assert run.model.hidden_size == 64 and run.model.num_attention_heads == 2
    assert run.model.capacity_factor == 1.25 and run.train.peak_flops is None
    # the resolved config written to a run directory reads back identically
    (tmp_path / "resolved.yaml").write_text(run.to_yaml())
    assert load_config(tmp_path / "resolved.yaml") == run


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown config key 'train.lrr'"),
    ("optim.lr=1", "unknown config key 'optim.lr'"),
    ("lr", "not of the form key=value"),
    ("train.lr=fast", "train.lr='fast' is invalid: expected float"),
    ("train.max_steps=2.5", "train.max_steps='2.5' is invalid: expected int"),
    ("train.schedule=linear", "expected one of 'step', 'cosine', 'constant'"),
    ("model.router=top3", "model.router='top3' is invalid"),
    ("train.batch_size=0", "batch_size=0 is invalid"),
    ("preset=nope", "unknown preset 'nope'"),
])
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises((ValueError, UserError), match=message):
        load_config(None, [override])


def test_coerce_scalars() -> None:
    assert from_text("1_000", int, "k") == 1000 and from_text("1e3", int, "k") == 1000
    assert from_text("yes", bool, "k") is True and from_text("0", bool, "k") is False
    assert from_text("none", int | None, "k") is None and from_text("3", int | None, "k") == 3


# --------------------------------------------------------------------------------------- run directory
def test_run_dir_holds_config_metrics_and_checkpoints(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert train(data_dir, out, "train.eval_every=3") == 0
    run = load_config(out / "config.yaml")
    assert run.model.vocab_size == 300 and run.model.hidden_size == 32 and run.train.max_steps == 6
    assert run.data == str(data_dir)
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    expected = {"kind", "step", "lr", "loss", "lm_loss", "expert_balance_loss", "device_balance_loss", "z_loss",
                "grad_norm", "tokens_per_s", "mfu", "tokens", "skipped_steps", "expert_load_max_over_mean",
                "dead_experts", "expert_load", "expert_load_entropy", "elapsed_s"}
    assert set(records[0]) == expected
    r = records[-1]
    assert [sum(layer) for layer in r["expert_load"]] == [4 * 32 * 2] * 2  # every token picks K=2 experts
    assert r["dead_experts"] == [layer.count(0) for layer in r["expert_load"]]
    assert len(r["expert_load_max_over_mean"]) == 2 and len(r["dead_experts"]) == 2
    assert all(1.0 <= x <= 8.0 for x in r["expert_load_max_over_mean"])  # max/mean is at most E
    assert r["tokens"] == 6 * 4 * 32 and r["skipped_steps"] == 0 and r["mfu"] > 0
    assert r["loss"] == pytest.approx(r["lm_loss"] + r["expert_balance_loss"])
    assert records[0]["loss"] > records[-1]["loss"]  # it learns
    assert [x["lr"] for x in records] == pytest.approx([1.5e-3, 3e-3, 3e-3, 3e-3, 3e-3, 3e-3 * 0.316])
    vals = read_metrics(out, "val")
    assert [v["step"] for v in vals] == [3, 6] and set(vals[0]) == {"kind", "step", "val_loss", "val_bpb",
                                                                    "val_tokens", "elapsed_s"}
    val_tokens = json.loads((data_dir / "meta.json").read_text())["splits"]["val"]["tokens"]
    # periodic: eval_batches=2 batches of 4 x 32 tokens; final: the whole split (every full window)
    assert [v["val_tokens"] for v in vals] == [256, (val_tokens - 1) // 32 * 32]
    assert [p.name for p in list_checkpoints(out)] == ["step_00000003", "step_00000006"]
    ckpt = list_checkpoints(out)[-1]
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "config.json", "tokenizer.json",
                                                "trainer_state.pt", "run_config.yaml"}
    assert load_training_state(ckpt)["progress"].data_index == 6


def test_seed_makes_runs_identical(data_dir: Path, tmp_path: Path) -> None:
    assert train(data_dir, tmp_path / "a", max_steps=3) == 0
    assert train(data_dir, tmp_path / "b", max_steps=3) == 0
    assert train(data_dir, tmp_path / "c", max_steps=3, seed=1) == 0
    assert losses(tmp_path / "a") == losses(tmp_path / "b") != losses(tmp_path / "c")


# ------------------------------------------------------------------------------------------------ resume
def test_resume_after_crash_is_bit_exact(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    assert train(data_dir, tmp_path / "straight") == 0

    def crash(parts):
        raise RuntimeError("power cut")
    monkeypatch.setattr(trainer_module, "total_loss", on_call(5, crash))  # during step 5; checkpoint at 3
    with pytest.raises(RuntimeError, match="power cut"):
        train(data_dir, tmp_path / "resumed")
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step_00000003"]
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 5, "lo')  # a record cut short (full disk, kill)
    assert train(data_dir, tmp_path / "resumed", resume=True) == 0

    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")  # bit for bit, steps 1..6, no repeats
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_stop_signal_saves_and_resume_continues_exactly(data_dir: Path, tmp_path: Path, monkeypatch, capsys,
                                                           sig: str) -> None:
    """Ctrl-C, and what schedulers (SIGTERM) and closed terminals (SIGHUP) send: finish the step, save, exit with
    128 + the signal number."""
    signum = getattr(signal, sig)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    assert train(data_dir, tmp_path / "straight", save_every=0) == 0
    monkeypatch.setattr(trainer_module, "total_loss", on_call(2, lambda p: os.kill(os.getpid(), signum)))
    assert train(data_dir, tmp_path / "run", save_every=0) == 128 + signum  # during step 2: finish it, save, stop
    monkeypatch.undo()
    assert f"interrupted ({sig}): saved step 2" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000002"]
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored
    assert train(data_dir, tmp_path / "run", resume=True, save_every=0) == 0
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")


@pytest.mark.parametrize("damaged", ["model.safetensors", "trainer_state.pt"])
def test_resume_falls_back_past_a_damaged_latest_checkpoint(data_dir: Path, tmp_path: Path, capsys,
                                                            damaged: str) -> None:
    """The newest checkpoint truncated (a full disk, a crash outside the atomic save): --resume warns, continues
    from the one before, and ends with the uninterrupted run's losses and weights."""
    assert train(data_dir, tmp_path / "straight") == 0
    assert train(data_dir, tmp_path / "run") == 0
    path = tmp_path / "run" / "checkpoints" / "step_00000006" / damaged
    path.write_bytes(path.read_bytes()[:100])
    capsys.readouterr()
    assert train(data_dir, tmp_path / "run", "train.max_steps=6", resume=True) == 0
    assert f"checkpoint {path.parent} cannot be read" in capsys.readouterr().err
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_damaged_metrics_line_before_the_last_names_the_file(data_dir: Path, tmp_path: Path, capsys) -> None:
    assert train(data_dir, tmp_path / "run", max_steps=3) == 0
    path = tmp_path / "run" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{garbage", *lines[1:]]) + "\n")
    capsys.readouterr()
    assert train(data_dir, tmp_path / "run", "train.max_steps=4", resume=True, max_steps=4) == 2
    assert f"{path} line 2 is not a JSON record" in _one_error_line(capsys)


def test_resume_before_the_first_checkpoint_starts_over(data_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """Killed before its first checkpoint, a run directory holds a config and some metrics: --resume starts it from
    step 0 (instead of refusing, while a fresh start refuses the non-empty directory) and repeats the straight run."""
    assert train(data_dir, tmp_path / "straight") == 0

    def crash(parts):
        raise RuntimeError("power cut")
    monkeypatch.setattr(trainer_module, "total_loss", on_call(2, crash))
    with pytest.raises(RuntimeError, match="power cut"):
        train(data_dir, tmp_path / "run")
    monkeypatch.undo()
    assert not list_checkpoints(tmp_path / "run")
    capsys.readouterr()
    assert train(data_dir, tmp_path / "run", resume=True) == 0
    assert "has no checkpoint yet; starting from step 0" in capsys.readouterr().err
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")


def test_resume_can_extend_the_run(data_dir: Path, tmp_path: Path) -> None:
    assert train(data_dir, tmp_path / "run", max_steps=3) == 0
    assert train(data_dir, tmp_path / "run", "train.max_steps=4", resume=True, max_steps=3) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]
    assert load_config(tmp_path / "run" / "config.yaml").train.max_steps == 4
    saved = list_checkpoints(tmp_path / "run")[-1]
    mtime = (saved / "trainer_state.pt").stat().st_mtime_ns
    assert train(data_dir, tmp_path / "run", resume=True, max_steps=4) == 0  # finished: nothing to do
    assert list_checkpoints(tmp_path / "run")[-1] == saved
    assert (saved / "trainer_state.pt").stat().st_mtime_ns == mtime
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------- non-finite
def test_nonfinite_steps_are_skipped_and_counted(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(trainer_module, "total_loss", on_call(2, nan_parts))  # step 2 only
    assert train(data_dir, tmp_path / "run", max_nonfinite=2) == 0
    records = read_metrics(tmp_path / "run")
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 1, 1, 1]
    assert all(torch.isfinite(v).all() for v in final_weights(tmp_path / "run").values())


def test_nonfinite_in_a_row_stops_with_last_good_checkpoint(data_dir: Path, tmp_path: Path, monkeypatch,
                                                             capsys) -> None:
    assert train(data_dir, tmp_path / "ref", max_steps=3) == 0
    monkeypatch.setattr(trainer_module, "total_loss", on_call(-4, nan_parts))  # steps 4, 5, 6 ...
    assert train(data_dir, tmp_path / "run", max_nonfinite=2) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("deepseekmoe: error: stopping at step 5: 2 non-finite losses in a row")
    assert "step_00000003" in err[-1]
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000003"]
    a, b = final_weights(tmp_path / "ref"), final_weights(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_optimizer_step_skips_update_on_nan(make_config) -> None:
    model = Transformer(make_config())
    cfg = TrainConfig(lr=1e-2, warmup_steps=0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randint(0, 97, (1, 4))).logits.sum().mul(float("nan")).backward()
    grad_norm, applied = optimizer_step(model, opt, sched, cfg, torch.tensor(float("nan")))
    assert not applied and grad_norm != grad_norm and sched.last_epoch == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters()) and not opt.state


# ------------------------------------------------------------------------------------ grad accumulation
def test_two_micro_batches_equal_one_double_batch(make_config) -> None:
    config = make_config(aux_loss_alpha=0.1, device_aux_loss_alpha=0.05, n_device_groups=2, z_loss_alpha=1e-3)
    a = Transformer(config)
    b = Transformer(config)
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, config.vocab_size, (4, 17))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    loss_a, counts_a = forward_backward(a, [(inputs[:2], targets[:2]), (inputs[2:], targets[2:])])
    loss_b, counts_b = forward_backward(b, [(inputs, targets)])
    assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-7)  # total, lm, expert/device balance, z
    assert (loss_a[2:] > 0).all()
    assert torch.equal(counts_a, counts_b)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-4, atol=1e-7), name


# ------------------------------------------------------------------------------------------- bad inputs
def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepseekmoe: error: ")
    return err[0]


def test_missing_data_dir(tmp_path: Path, capsys) -> None:
    assert train(tmp_path / "nope", tmp_path / "run") == 2
    assert "nope is not a data directory" in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_unknown_preset(data_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["train", "--preset", "tiny-nope", "--data", str(data_dir), "--out", str(tmp_path / "r")]) == 2
    assert "unknown preset 'tiny-nope'" in _one_error_line(capsys)


def test_existing_run_dir_is_not_clobbered(data_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert train(data_dir, out) == 2
    assert "is not empty: pass --resume" in _one_error_line(capsys)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_resume_without_a_run(data_dir: Path, tmp_path: Path, capsys) -> None:
    assert train(data_dir, tmp_path / "run", resume=True) == 2
    assert "holds no run to resume" in _one_error_line(capsys)


def test_unknown_key_and_stray_argument(data_dir: Path, tmp_path: Path, capsys) -> None:
    assert main(["train", "train.lrr=1", "--data", str(data_dir), "--out", str(tmp_path / "r")]) == 2
    assert "unknown config key 'train.lrr'" in _one_error_line(capsys)
    assert main(["train", "a.yaml", "b.yaml", "--data", str(data_dir)]) == 2
    assert "unexpected argument 'b.yaml'" in _one_error_line(capsys)
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in _one_error_line(capsys)


def test_seq_len_beyond_context(data_dir: Path, tmp_path: Path, capsys) -> None:
    assert train(data_dir, tmp_path / "r", seq_len=128) == 2
    assert "train.seq_len=128 exceeds model.max_position_embeddings=64" in _one_error_line(capsys)


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_cli_prepare_then_train(tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"doc{i}.txt").write_text(" ".join(f"line {j} of document {i}: the value is {i * j}."
                                                     for j in range(40)))
    assert main(["prepare", str(corpus), "--out", str(tmp_path / "data"), "--vocab-size", "400",
                 "--val-fraction", "0.2"]) == 0
    assert main(["train", *tiny_overrides(sample_tokens=8, save_every=0, max_steps=4), "--data",
                 str(tmp_path / "data"), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "validation loss" in out and "sample:" in out
    model, ckpt = load_model(tmp_path / "run")
    assert ckpt.name == "step_00000004" and model.config.vocab_size == 400


# ---------------------------------------------------------------------------------------------- recipes
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_tiny_recipe_is_the_no_argument_default() -> None:
    assert load_config(CONFIGS / "tiny-deepseekmoe.yaml") == load_config()


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_recipe_loads(recipe: str) -> None:
    run = load_config(CONFIGS / recipe)
    assert run.preset and run.train.seq_len <= run.model.max_position_embeddings


@pytest.mark.slow
def test_main_job_model_is_bit_reproducible_on_two_threads(tmp_path: Path, monkeypatch, capsys) -> None:
    """The default main-job recipe (tiny-deepseekmoe: 63 routed experts, 8 x 256 tokens a step) on 2 intra-op
    threads, with the CPU runtime the command applies: two 20-step runs give the same losses and gradient norms
    bit for bit, and a run stopped after its step-10 checkpoint and resumed to 20 repeats them too."""
    data = make_data_dir(tmp_path / "data", train_docs=400)
    before = torch.get_num_threads()
    torch.set_num_threads(2)

    def run(out: str, resume: bool = False) -> int:
        args = ["train", str(CONFIGS / "tiny-deepseekmoe.yaml"), "train.log_every=1", "train.eval_every=0",
                "train.save_every=10", "train.final_eval_batches=2", "train.sample_tokens=0",
                "train.tensorboard=false", "train.device=cpu", "--max-steps", "20", "--data", str(data),
                "--out", str(tmp_path / out)]
        return main(args + (["--resume"] if resume else []))
    try:
        assert run("a") == 0
        assert "routed experts: grouped (per_expert, cpu runtime: 2 workers)" in capsys.readouterr().out
        assert run("b") == 0

        def crash(parts):
            raise RuntimeError("power cut")
        monkeypatch.setattr(trainer_module, "total_loss", on_call(14, crash))  # during step 14
        with pytest.raises(RuntimeError, match="power cut"):
            run("resumed")
        monkeypatch.undo()
        assert [p.name for p in list_checkpoints(tmp_path / "resumed")] == ["step_00000010"]
        assert run("resumed", resume=True) == 0
    finally:
        torch.set_num_threads(before)
    first = losses(tmp_path / "a")
    assert len(first) == 20
    assert losses(tmp_path / "b") == first
    assert losses(tmp_path / "resumed") == first


_MKL_MODE = """
import sys, torch
if sys.argv[1] == "late":
    torch.ones(4, 4) @ torch.ones(4, 4)  # MKL started before deepseekmoe sets MKL_CBWR
from deepseekmoe.runtime.cpu import mkl_strict
torch.ones(4, 4) @ torch.ones(4, 4)
print(mkl_strict())
"""


def test_mkl_runs_strict_once_deepseekmoe_is_imported_first(data_dir: Path, tmp_path: Path, monkeypatch,
                                                            capsys) -> None:
    """`import deepseekmoe` before MKL's first call: strict mode (what keeps the resumed run above bit for bit on
    an AVX2 machine), unless the user set MKL_CBWR; after it: not, and `train` says so."""
    import subprocess
    import sys

    from deepseekmoe.runtime.cpu import mkl_strict
    from deepseekmoe.train import run as run_module

    if mkl_strict() is None:
        pytest.skip("torch's BLAS here is not MKL")
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    mode = lambda when, **extra: subprocess.run([sys.executable, "-c", _MKL_MODE, when], env={**env, **extra},  # noqa: E731
                                                 check=True, capture_output=True, text=True).stdout.strip()
    assert mode("first") == "True" and mode("late") == "False" and mode("first", MKL_CBWR="") == "False"
    monkeypatch.setattr(run_module, "mkl_strict", lambda: False)
    assert train(data_dir, tmp_path / "run", max_steps=1) == 0
    assert "may not repeat the uninterrupted one bit for bit" in capsys.readouterr().err
    monkeypatch.setenv("MKL_CBWR", "")  # MKL's default asked for: nothing to say
    assert train(data_dir, tmp_path / "run2", max_steps=1) == 0
    assert "bit for bit" not in capsys.readouterr().err


def test_a_second_trainer_in_the_same_run_directory_is_refused(data_dir: Path, tmp_path: Path, capsys) -> None:
    """A run directory another trainer holds (train.lock) is refused with one line and left as it was; once the
    holder is gone the run resumes."""
    fcntl = pytest.importorskip("fcntl")
    assert train(data_dir, tmp_path / "run", max_steps=3) == 0
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with open(tmp_path / "run" / "train.lock", "a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        capsys.readouterr()
        assert train(data_dir, tmp_path / "run", "train.max_steps=4", resume=True, max_steps=4) == 2
        assert "is in use by another trainer" in _one_error_line(capsys)
        assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
    assert train(data_dir, tmp_path / "run", "train.max_steps=4", resume=True, max_steps=4) == 0


@pytest.mark.parametrize("extra, needle", [
    (["train.device=foo"], "train.device='foo' is not a device"),
    (["train.step_decay_at=[a"], "train.step_decay_at='[a' is invalid"),
])
def test_more_bad_settings_are_one_line(data_dir: Path, tmp_path: Path, capsys, extra, needle) -> None:
    assert train(data_dir, tmp_path / "run", *extra) == 2
    assert needle in _one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_config_file_that_is_not_utf8_names_itself(data_dir: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"train:\n  lr: \xff\xfe\n")
    assert main(["train", str(bad), "--data", str(data_dir), "--out", str(tmp_path / "run")]) == 2
    assert f"{bad}: not UTF-8 text" in _one_error_line(capsys)


@pytest.mark.parametrize("drop", ["splits", "vocab_size"])
def test_a_meta_json_missing_a_field_names_file_and_field(tmp_path: Path, capsys, drop: str) -> None:
    import json

    data = make_data_dir(tmp_path / "data")
    meta = json.loads((data / "meta.json").read_text())
    del meta[drop]
    (data / "meta.json").write_text(json.dumps(meta))
    assert train(data, tmp_path / "run") == 2
    assert f"{data / 'meta.json'} lacks {drop}" in _one_error_line(capsys)
