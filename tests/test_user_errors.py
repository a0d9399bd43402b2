"""Bad input, command by command: exit code 2, one `deepseekmoe: error:` line naming the problem, no traceback, and
the output path untouched (absent before, absent after; an existing file or directory unchanged)."""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from deepseekmoe.cli import main
from train_helpers import make_data_dir, tiny_overrides


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A data directory, a two-step run, its checkpoint, and damaged or unusual inputs made from them."""
    root = tmp_path_factory.mktemp("errors")
    data = make_data_dir(root / "data")
    run = root / "run"
    assert main(["train", *tiny_overrides(max_steps=2, save_every=2), "--data", str(data), "--out", str(run)]) == 0
    ckpt = run / "checkpoints" / "step_00000002"
    wrong = root / "wrong_config"  # config.json disagrees with the tensors
    shutil.copytree(ckpt, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "moe_intermediate_size": 24}))
    small_val = root / "small_val"  # a validation split shorter than one window
    shutil.copytree(data, small_val)
    meta = json.loads((small_val / "meta.json").read_text())
    (small_val / "val.bin").write_bytes((small_val / "val.bin").read_bytes()[:2 * 20])
    meta["splits"]["val"]["tokens"] = 20
    (small_val / "meta.json").write_text(json.dumps(meta))
    escape = root / "hf_escape"  # an HF index naming a shard outside its directory
    assert main(["convert", "--to-hf", str(ckpt), "--out", str(escape)]) == 0
    with safe_open(escape / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    (escape / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: "../hf_escape/model.safetensors" for k in keys}}))
    (root / "empty.txt").write_text("")
    (root / "a_file").write_text("keep me\n")
    (root / "a_dir").mkdir()
    return {"root": root, "data": data, "run": run, "ckpt": ckpt, "wrong": wrong, "small_val": small_val,
            "escape": escape}


# (argv with {placeholders}, words the one error line must contain, the output path that must stay as it was)
CASES = {
    "bench-batch-0": ("bench train-step --batch 0", "--batch must be positive", None),
    "bench-new-tokens-negative": ("bench decode --new-tokens -3", "--new-tokens must be positive", None),
    "report-out-dir": ("report {run} --out {root}/a_dir", "is a directory", "{root}/a_dir"),
    "report-out-under-file": ("report {run} --out {root}/a_file/r.html", "is not a directory", "{root}/a_file"),
    "analyze-out-file": ("analyze {ckpt} --data {data} --out {root}/a_file", "exists and is not a directory",
                         "{root}/a_file"),
    "compare-out-file": ("compare --out {root}/a_file --steps 1", "exists and is not a directory", "{root}/a_file"),
    "compare-seq-len-0": ("compare --out {root}/new_compare --seq-len 0", "--seq-len must be at least 1",
                          "{root}/new_compare"),
    "compare-budgets-without-scaling": ("compare --out {root}/new_compare --budgets 1M", "--suite scaling only",
                                        "{root}/new_compare"),
    "compare-scaling-with-steps": ("compare --suite scaling --out {root}/new_compare --steps 3", "--budgets sets",
                                   "{root}/new_compare"),
    "compare-scaling-bad-budget": ("compare --suite scaling --out {root}/new_compare --budgets 1X", "'1X'",
                                   "{root}/new_compare"),
    "eval-empty-text": ("eval {ckpt} --data {root}/empty.txt", "empty.txt is empty", None),
    "eval-config-shapes": ("eval {wrong} --data {data}",
                           "layers.0.mlp.experts.down_proj has shape [8, 32, 16], but", None),
    "generate-config-shapes": ("generate {wrong} --prompt hi", "implies [8, 32, 24]", None),
    "train-val-too-small": ("train --data {small_val} --out {root}/new_run " + " ".join(tiny_overrides()),
                            "validation split of", "{root}/new_run"),
    "convert-shard-escapes": ("convert --from-hf {escape} --out {root}/new_ckpt", "not a file inside",
                              "{root}/new_ckpt"),
    "device-unknown": ("eval {ckpt} --data {data} --device foo", "foo", None),
    "plan-flops-0": ("plan --preset deepseekmoe-16b --gpus 8 --flops 0", "--flops", None),
    "generate-max-new-negative": ("generate {ckpt} --prompt hi --max-new-tokens -5", "max_new_tokens=-5", None),
    "train-bad-list": ("train --data {data} --out {root}/new_run2 train.step_decay_at=[a", "step_decay_at",
                       "{root}/new_run2"),
}


def _snapshot(path: Path) -> object:
    if not path.exists():
        return None
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("case", CASES)
def test_a_bad_input_is_one_line_and_touches_nothing(world, case, capsys):
    argv, needle, guarded = CASES[case]
    fill = {k: str(v) for k, v in world.items()}
    guarded_path = Path(guarded.format(**fill)) if guarded else None
    before = _snapshot(guarded_path) if guarded_path else None
    leftovers_before = sorted(world["root"].iterdir())
    capsys.readouterr()
    assert main(argv.format(**fill).split()) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("deepseekmoe: error: "), err
    assert needle in err[0]
    if guarded_path:
        assert _snapshot(guarded_path) == before
    assert sorted(world["root"].iterdir()) == leftovers_before  # no stray .tmp file or half-made directory


def test_options_may_come_between_and_after_overrides(world, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "train.lr=1e-3", "--data", str(world["data"]), *tiny_overrides(max_steps=1), "--out", str(out),
            "train.lr=2e-3", "--max-steps", "1", "train.seed=7"]
    assert main(argv) == 0
    config = (out / "config.yaml").read_text()
    assert "lr: 0.002" in config and "seed: 7" in config


def test_a_closed_pipe_is_not_a_traceback():
    import subprocess
    import sys

    # `true` exits without reading, so every write of the table meets a closed pipe
    proc = subprocess.run(f"{sys.executable} -m deepseekmoe info --preset deepseekmoe-145b | true",
                          shell=True, capture_output=True, text=True)
    assert proc.stderr == "", proc.stderr


@pytest.mark.parametrize("error, one_line", [("UserValueError", True), ("ValueError", False), ("KeyError", False)])
def test_only_user_errors_become_one_line(monkeypatch, capsys, error, one_line):
    """A bad setting (UserValueError, also a ValueError for callers that catch that) is one line and exit code 2;
    a ValueError or KeyError from anywhere else is a bug, and keeps its traceback."""
    import deepseekmoe.commands.info as info
    from deepseekmoe import errors

    exc = {"UserValueError": errors.UserValueError, "ValueError": ValueError, "KeyError": KeyError}[error]
    assert issubclass(errors.UserValueError, ValueError) and issubclass(errors.UserValueError, errors.UserError)

    @functools.wraps(info.info_command)  # the same options
    def fails(**_: object) -> int:
        raise exc("something is off")

    monkeypatch.setattr(info, "info_command", fails)
    if one_line:
        assert main(["info"]) == 2
        assert capsys.readouterr().err == "deepseekmoe: error: something is off\n"
    else:
        with pytest.raises(exc, match="something is off"):
            main(["info"])
