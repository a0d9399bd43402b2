"""Runs killed for real: `kill -9` at random moments and in the middle of a save, and a disk that fills up. Each time
`train` (again, or with --resume) carries on from the newest good state, and the finished run's losses and weights
equal an uninterrupted run's bit for bit. Every run is a separate process, as a user's would be."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deepseekmoe.convert.load import load_model
from train_helpers import make_data_dir, read_metrics, tiny_overrides

pytestmark = pytest.mark.slow

STEPS = 10
# one thread in every process: the same bits however the machine is loaded (the run is tiny anyway)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


def train_argv(data: Path, out: Path, resume: bool) -> list[str]:
    argv = [sys.executable, "-m", "deepseekmoe", "train", *tiny_overrides(max_steps=STEPS, save_every=2),
            "--data", str(data), "--out", str(out)]
    return argv + (["--resume"] if resume else [])


def run_train(data: Path, out: Path, resume: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(train_argv(data, out, resume), env=ENV, capture_output=True, text=True, timeout=300)


def resumable(out: Path) -> bool:
    return (out / "config.yaml").is_file()


def outcome(run_dir: Path) -> tuple[list, dict[str, torch.Tensor]]:
    losses = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir)]
    return losses, load_model(run_dir)[0].state_dict()


def assert_same_run(run_dir: Path, straight: Path) -> None:
    (losses, weights), (want_losses, want_weights) = outcome(run_dir), outcome(straight)
    assert [s for s, *_ in losses] == list(range(1, STEPS + 1))
    assert losses == want_losses
    assert all(torch.equal(weights[k], want_weights[k]) for k in want_weights)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("crash")
    data = make_data_dir(root / "data")
    straight = root / "straight"
    proc = run_train(data, straight)
    assert proc.returncode == 0, proc.stderr
    return data, straight


def test_kill_9_at_random_moments_then_resume(setup, tmp_path):
    data, straight = setup
    rng = random.Random(0)
    out = tmp_path / "run"
    for _ in range(4):  # killed anywhere from start-up to the last save; the start-up takes about a second
        proc = subprocess.Popen(train_argv(data, out, resumable(out)), env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 3.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = run_train(data, out, resume=resumable(out))
    assert proc.returncode == 0, proc.stderr
    assert_same_run(out, straight)


def test_kill_9_in_the_middle_of_a_save(setup, tmp_path):
    """The process is killed while the second checkpoint is half written (its model file written, the trainer
    state not yet): the half-written directory is ignored and the run resumes from the first checkpoint."""
    data, straight = setup
    out, marker = tmp_path / "run", tmp_path / "half_written"
    hook = (f"import sys, time; import deepseekmoe.checkpoint as c; real = c.save_file; n = [0]\n"
            f"def save_file(*a, **k):\n"
            f"    real(*a, **k); n[0] += 1\n"
            f"    if n[0] == 2: open({str(marker)!r}, 'w').close(); time.sleep(60)\n"
            f"c.save_file = save_file\n"
            f"from deepseekmoe.cli import main; sys.exit(main(sys.argv[1:]))\n")
    argv = train_argv(data, out, resume=False)
    proc = subprocess.Popen([sys.executable, "-c", hook, *argv[3:]], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), "the save hook never ran"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert left[0] == "step_00000002" and any(".tmp-" in name for name in left)  # the half-written one
    proc = run_train(data, out, resume=True)
    assert proc.returncode == 0, proc.stderr
    assert not any(".tmp-" in p.name for p in (out / "checkpoints").iterdir())
    assert_same_run(out, straight)


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare") or sys.platform != "linux":
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="no user+mount namespace to mount a small tmpfs in")
def test_a_full_disk_stops_with_one_line_and_resume_repeats_the_run(setup, tmp_path):
    """A run directory on a file system with room for one checkpoint and a half: the second save fails, train
    exits 2 with one line naming it and leaves the first checkpoint; after room is made, --resume finishes the
    run exactly."""
    data, straight = setup
    one = sum(f.stat().st_size for f in (straight / "checkpoints" / f"step_{STEPS:08d}").iterdir())
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "run"
    first, second = (" ".join(map(_quote, train_argv(data, out, resume))) for resume in (False, True))
    script = (f"mount -t tmpfs -o size={one * 3 // 2} tmpfs {disk}\n"
              f"{first} 2> {tmp_path}/first.err; echo $? > {tmp_path}/first.rc\n"
              f"ls {out}/checkpoints > {tmp_path}/first.ls\n"
              f"mount -o remount,size={one * 8} {disk}\n"
              f"{second} 2> {tmp_path}/second.err; echo $? > {tmp_path}/second.rc\n"
              f"cp -r {out} {tmp_path}/result\n")
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], env=ENV, timeout=300,
                   check=True)
    errors = [line for line in (tmp_path / "first.err").read_text().splitlines()
              if line.startswith("deepseekmoe") or "Traceback" in line]
    assert (tmp_path / "first.rc").read_text().strip() == "2"
    assert errors == [f"deepseekmoe: error: {out}/checkpoints/step_00000004: No space left on device"]
    assert (tmp_path / "first.ls").read_text().split() == ["step_00000002"]
    assert (tmp_path / "second.rc").read_text().strip() == "0", (tmp_path / "second.err").read_text()
    assert_same_run(tmp_path / "result", straight)
    assert json.loads((tmp_path / "result" / "metrics.jsonl").read_text().splitlines()[-1])["kind"] == "val"


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"
