"""Checkpoints: model round trip, training-state round trip, keep-last-N, and crashes while saving."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from deepseekmoe import Transformer
from deepseekmoe.train import state as state_module
from deepseekmoe.checkpoint import list_checkpoints, load_checkpoint, save_model
from deepseekmoe.convert.load import load_model, resolve_checkpoint
from deepseekmoe.train.config import TrainConfig
from deepseekmoe.train.optim import build_optimizer, build_scheduler
from deepseekmoe.train.state import (Progress, load_training_state, prune_checkpoints, save_training_checkpoint,
                                     set_rng_state)


def _trained(make_config, steps: int = 2, **config: object):
    """A tiny model, optimizer and scheduler after a few real AdamW steps (so the optimizer has state)."""
    model = Transformer(make_config(**config))
    cfg = TrainConfig(lr=1e-2, warmup_steps=1, max_steps=10)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 8))
        model(ids).logits.logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return model, opt, sched


def _save(run_dir: Path, model, opt, sched, step: int, keep_last: int = 10) -> Path:
    return save_training_checkpoint(run_dir, model, opt.state_dict(), sched, Progress(step=step, data_index=2 * step),
                                    "train: {}\n", None, keep_last)


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("tied", [False, True])
def test_model_round_trip_is_exact(tmp_path: Path, make_config, tied: bool) -> None:
    model = Transformer(make_config(tie_word_embeddings=tied))
    save_model(model, tmp_path / "ckpt")
    loaded, where = load_model(tmp_path / "ckpt")
    assert where == tmp_path / "ckpt" and loaded.config == model.config
    _assert_same_weights(model, loaded)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    assert torch.equal(model(ids).logits, loaded(ids).logits)


def _mapped_files(tensor: torch.Tensor) -> set[str]:
    """The files mapped where the tensor's storage lies (Linux /proc/self/maps)."""
    ptr = tensor.untyped_storage().data_ptr()
    found = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split()
        lo, hi = (int(x, 16) for x in span.split("-"))
        if lo <= ptr < hi and len(rest) >= 5:
            found.add(rest[4])
    return found


def test_a_float_checkpoint_loads_memory_mapped_and_copy_on_write(tmp_path: Path, make_config) -> None:
    model = Transformer(make_config())
    save_model(model, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    before = weights.read_bytes()
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert all(_mapped_files(p) == {str(weights)} for p in loaded.parameters())
    with torch.no_grad():
        for p in loaded.parameters():
            p.add_(1.0)  # what an optimizer step does: a private copy of the page, never the file
    assert weights.read_bytes() == before
    _assert_same_weights(model, load_checkpoint(tmp_path / "ckpt")[0])


def test_a_bf16_checkpoint_loads_in_the_default_dtype_unless_asked(tmp_path: Path, make_config) -> None:
    model = Transformer(make_config()).to(torch.bfloat16)
    save_model(model, tmp_path / "ckpt")
    assert {p.dtype for p in load_checkpoint(tmp_path / "ckpt")[0].parameters()} == {torch.float32}
    kept = load_checkpoint(tmp_path / "ckpt", dtype=torch.bfloat16)[0]
    _assert_same_weights(model, kept)


def test_training_state_round_trip(tmp_path: Path, make_config) -> None:
    model, opt, sched = _trained(make_config)
    torch.manual_seed(123)
    random.seed(7)
    ckpt = _save(tmp_path, model, opt, sched, step=2)
    expected_torch, expected_py = torch.rand(3), random.random()
    assert (ckpt / "run_config.yaml").read_text() == "train: {}\n"

    state = load_training_state(ckpt)
    assert state["progress"] == Progress(step=2, data_index=4)
    set_rng_state(state["rng"])
    assert torch.equal(torch.rand(3), expected_torch) and random.random() == expected_py
    loaded, _ = load_model(ckpt)
    _assert_same_weights(model, loaded)
    opt2 = build_optimizer(loaded, TrainConfig(lr=1e-2, warmup_steps=1, max_steps=10))
    opt2.load_state_dict(state["optimizer"])
    for p, q in zip(opt.param_groups[0]["params"], opt2.param_groups[0]["params"]):
        assert torch.equal(opt.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"])
    assert state["scheduler"]["last_epoch"] == 2


def test_keep_last_n(tmp_path: Path, make_config) -> None:
    model, opt, sched = _trained(make_config, steps=0)
    for step in range(1, 6):
        _save(tmp_path, model, opt, sched, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000004", "step_00000005"]


@pytest.mark.parametrize("failing", ["write_model_files", "torch.save"])
def test_crash_while_saving_keeps_previous_checkpoint(tmp_path: Path, make_config, monkeypatch,
                                                      failing: str) -> None:
    model, opt, sched = _trained(make_config)
    good = _save(tmp_path, model, opt, sched, step=3, keep_last=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model2, _, _ = _trained(make_config, steps=1)  # different weights for the failing save

    def explode(*args, **kwargs):
        real(*args, **kwargs)  # part of the files are written, then the "disk fills up"
        raise OSError("disk full")

    if failing == "torch.save":
        real = torch.save
        monkeypatch.setattr(state_module.torch, "save", explode)
    else:
        real = state_module.write_model_files
        monkeypatch.setattr(state_module, "write_model_files", explode)
    with pytest.raises(OSError, match="disk full"):
        _save(tmp_path, model2, opt, sched, step=6, keep_last=1)

    assert list_checkpoints(tmp_path) == [good]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000003"]  # no leftovers
    loaded, where = load_model(tmp_path)
    assert where == good
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert load_training_state(good)["progress"].step == 3


def test_leftovers_of_a_killed_save_are_ignored_and_pruned(tmp_path: Path, make_config) -> None:
    model, opt, sched = _trained(make_config, steps=0)
    good = _save(tmp_path, model, opt, sched, step=3)
    # a process killed mid-save leaves its temporary directory behind, possibly with a complete-looking model
    leftover = tmp_path / "checkpoints" / "step_00000006.tmp-abc123"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    assert list_checkpoints(tmp_path) == [good]
    assert resolve_checkpoint(tmp_path) == good
    prune_checkpoints(tmp_path, keep_last=5)
    assert not leftover.exists() and good.is_dir()


def test_model_only_checkpoint_cannot_be_resumed(tmp_path: Path, make_config) -> None:
    save_model(Transformer(make_config()), tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="model-only checkpoint"):
        load_training_state(tmp_path / "ckpt")


def test_a_committed_directory_is_flushed_before_and_after_the_rename(tmp_path, monkeypatch):
    """Every file and the directory reach the disk before the rename, the parent after it: a power loss leaves
    the old directory or the complete new one."""
    from deepseekmoe import fileio

    events = []
    real_fsync, real_replace = fileio._fsync, fileio.os.replace
    monkeypatch.setattr(fileio, "_fsync", lambda p: events.append(("fsync", Path(p).name)) or real_fsync(p))
    monkeypatch.setattr(fileio.os, "replace", lambda a, b: events.append(("rename", Path(b).name)) or
                        real_replace(a, b))
    final = tmp_path / "ckpt"
    with fileio.written_atomically(final) as tmp:
        (tmp / "a.bin").write_bytes(b"1")
        (tmp / "b.json").write_text("{}")
    flushed = {name for kind, name in events[:-2] if kind == "fsync"}
    assert {"a.bin", "b.json", tmp.name} <= flushed
    assert events[-2:] == [("rename", "ckpt"), ("fsync", tmp_path.name)]
    assert (final / "a.bin").read_bytes() == b"1"
