"""`deepseekmoe info`: JSON and table output equal accounting.count; --config with YAML and HF config.json;
one-line errors with exit code 2; `deepseekmoe --help`."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import asdict

import pytest

from deepseekmoe import load_preset, preset_names
from deepseekmoe.accounting import count
from deepseekmoe.cli import COMMANDS, main

REQUIRED = ("total_params", "active_params", "flops_per_token", "seq_len", "flops_per_sequence",
            "expert_combinations")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _json(capsys, *argv: str) -> dict:
    rc, out, err = _run(capsys, "info", *argv, "--json")
    assert rc == 0 and err == ""
    lines = out.strip().splitlines()
    assert len(lines) == 1  # one JSON object on one line
    return json.loads(lines[0])


def test_json_for_the_16b_preset(capsys):
    data = _json(capsys, "--preset", "deepseekmoe-16b")
    acc = count(load_preset("deepseekmoe-16b"))
    for key in REQUIRED:
        assert data[key] == getattr(acc, key), key
    assert data["seq_len"] == 4096
    assert data["flops_per_sequence"] == data["flops_per_token"] * 4096
    assert data["expert_combinations"] == math.comb(64, 6)
    assert round(data["total_params"] / 1e9, 1) == 16.4 and round(data["active_params"] / 1e9, 1) == 2.8


def test_json_seq_len_option(capsys):
    data = _json(capsys, "--preset", "deepseekmoe-2b", "--seq-len", "2048")
    assert data == {"name": "deepseekmoe-2b", **asdict(count(load_preset("deepseekmoe-2b"), 2048))}
    assert data["flops_per_sequence"] / 1e12 == pytest.approx(4.3, rel=0.03)


def test_table_form(capsys):
    rc, out, err = _run(capsys, "info", "--preset", "deepseekmoe-16b")
    assert rc == 0 and err == ""
    acc = count(load_preset("deepseekmoe-16b"))
    rows = dict(line.split("  ", 1) for line in out.strip().splitlines())
    rows = {k.strip(): v.strip() for k, v in rows.items()}
    assert rows["model"] == "deepseekmoe-16b"
    assert rows["total params"] == f"{acc.total_params:,} (16.38B)"
    assert rows["activated params / token"] == f"{acc.active_params:,} (2.83B)"
    assert rows["training FLOPs / token"].startswith(f"{acc.flops_per_token:,} ")
    assert rows["training FLOPs / 4096 tokens"] == f"{acc.flops_per_sequence / 1e12:.2f}T"
    assert rows["MoE layers"] == "27 of 28"
    assert rows["expert combinations C(N', K')"] == f"{math.comb(64, 6):,}"


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file(capsys, tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    load_preset("tiny-gshard").save(path)
    data = _json(capsys, "--config", str(path))
    assert data["name"] == str(path)
    for key in REQUIRED:
        assert data[key] == getattr(count(load_preset("tiny-gshard")), key), key


def test_hf_config_json(capsys, tmp_path, released_16b_config):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(released_16b_config))
    by_file = _json(capsys, "--config", str(path))
    by_preset = _json(capsys, "--preset", "deepseekmoe-16b")
    assert {k: by_file[k] for k in REQUIRED} == {k: by_preset[k] for k in REQUIRED}


@pytest.mark.parametrize("argv, message", [
    (["--preset", "deepseekmoe-17b"], "unknown preset 'deepseekmoe-17b'; available: "),
    ([], "give exactly one of --preset NAME or --config FILE"),
    (["--preset", "tiny-dense", "--config", "x.yaml"], "give exactly one of --preset NAME or --config FILE"),
    (["--config", "does/not/exist.yaml"], "config file not found: does/not/exist.yaml"),
])
def test_user_errors_are_one_line_with_exit_code_2(capsys, argv, message):
    rc, out, err = _run(capsys, "info", *argv)
    assert rc == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"deepseekmoe: error: {message}")


def test_unknown_preset_lists_every_name(capsys):
    _, _, err = _run(capsys, "info", "--preset", "nope")
    listed = err.strip().split("available: ", 1)[1].split(", ")
    assert listed == preset_names()


def test_invalid_config_values_are_one_line(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("n_routed_experts: 8\nnum_experts_per_tok: 9\n")
    rc, _, err = _run(capsys, "info", "--config", str(path))
    assert rc == 2
    assert err == "deepseekmoe: error: num_experts_per_tok=9 exceeds n_routed_experts=8\n"


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepseekmoe", *argv], capture_output=True, text=True, timeout=120)


def test_module_entry_point_runs_info():
    ok = _cli("info", "--preset", "deepseekmoe-145b", "--json")
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert round(data["total_params"] / 1e9, 1) == 144.6 and round(data["active_params"] / 1e9, 1) == 22.2


def test_help_lists_every_subcommand(capsys):
    result = _cli("--help")
    assert result.returncode == 0, result.stderr
    for name in COMMANDS:
        assert name in result.stdout
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--preset", "--config", "--seq-len", "--json"):
        assert option in out


@pytest.mark.parametrize("value", ["0", "-5"])
def test_bad_seq_len_is_rejected(capsys, value):
    rc, out, err = _run(capsys, "info", "--preset", "tiny-dense", f"--seq-len={value}")
    assert rc == 2 and out == ""
    assert err == f"deepseekmoe: error: seq_len={value} is invalid: expected an integer >= 1\n"


@pytest.mark.parametrize("argv", [["info", "--bogus"], ["no-such-command"], ["info", "--seq-len", "abc"]])
def test_usage_mistakes_are_one_line(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0]
