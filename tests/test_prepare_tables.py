"""`deepseekmoe prepare` on Parquet, Arrow, JSON and cached hub datasets (through HF `datasets`), and the inputs it
refuses: binary files, missing text fields, JSON nested too deeply, tables without `datasets` installed."""

from __future__ import annotations

import gzip
import json
import shutil
import sys
from pathlib import Path

import pytest

from deepseekmoe import cli
from test_data import make_docs

datasets = pytest.importorskip("datasets")
pyarrow = pytest.importorskip("pyarrow")

OUTPUTS = ("tokenizer.json", "train.bin", "val.bin")


def rows(field: str = "text") -> list[dict]:
    return [{"id": i, field: doc} for i, doc in enumerate(make_docs(30))]


def run(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()  # drop the test's own output (datasets' progress bars while writing tables)
    rc = cli.main(["prepare", *args, "--vocab-size", "300"])
    return rc, capsys.readouterr().err


def outputs(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in OUTPUTS}


def write_tables(root: Path, field: str = "text") -> dict[str, Path]:
    """The same rows as .jsonl, .jsonl.gz, .json (an array), .json.gz, .parquet and two kinds of .arrow."""
    root.mkdir(parents=True, exist_ok=True)
    data = rows(field)
    lines = "".join(json.dumps(r) + "\n" for r in data)
    files = {"jsonl": root / "t.jsonl", "jsonl.gz": root / "t.jsonl.gz", "json": root / "t.json",
             "json.gz": root / "t.json.gz", "parquet": root / "t.parquet", "arrow-stream": root / "saved",
             "arrow-file": root / "file.arrow"}
    files["jsonl"].write_text(lines)
    files["jsonl.gz"].write_bytes(gzip.compress(lines.encode()))
    files["json"].write_text(json.dumps(data))
    files["json.gz"].write_bytes(gzip.compress(json.dumps(data).encode()))
    table = datasets.Dataset.from_list(data)
    table.to_parquet(str(files["parquet"]))
    table.save_to_disk(str(files["arrow-stream"]))  # a directory holding data-00000-of-00001.arrow (IPC stream)
    with pyarrow.ipc.new_file(str(files["arrow-file"]), table.data.table.schema) as writer:  # IPC file format
        writer.write_table(table.data.table)
    return files


def cache_hub_dataset(cache: Path, repo: str, splits: dict[str, Path]) -> None:
    """Lay out `repo` in a datasets cache as an online load_dataset leaves it: OWNER___NAME/default/0.0.0/HASH/
    with NAME-SPLIT.arrow files and dataset_info.json (built here by datasets' own Parquet builder)."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    owner, name = repo.split("/")
    builder = Parquet(cache_dir=str(cache / "build"), dataset_name=name, hash="0123abcd",
                      data_files={split: str(path) for split, path in splits.items()})
    builder.download_and_prepare()
    target = cache / f"{owner}___{name}" / "default" / "0.0.0" / "0123abcd"
    shutil.copytree(builder.cache_dir, target)
    info = json.loads((target / "dataset_info.json").read_text())
    (target / "dataset_info.json").write_text(json.dumps({**info, "config_name": "default"}))
    shutil.rmtree(cache / "build")


def test_every_table_format_gives_the_bytes_of_jsonl(tmp_path, capsys):
    files = write_tables(tmp_path / "src")
    got = {}
    for kind, path in files.items():
        rc, err = run(capsys, str(path), "--out", str(tmp_path / kind))
        assert rc == 0, err
        got[kind] = outputs(tmp_path / kind)
    assert all(got[kind] == got["jsonl"] for kind in files), [k for k in files if got[k] != got["jsonl"]]
    # deterministic: a forced rebuild writes the same bytes; an unchanged table is a no-op
    rc, err = run(capsys, str(files["parquet"]), "--out", str(tmp_path / "parquet"), "--force")
    assert rc == 0 and outputs(tmp_path / "parquet") == got["jsonl"]
    rc, err = run(capsys, str(files["parquet"]), "--out", str(tmp_path / "parquet"))
    assert rc == 0 and "up to date" in err


def test_text_field_names_the_column(tmp_path, capsys):
    plain, body = write_tables(tmp_path / "plain"), write_tables(tmp_path / "body", field="body")
    assert run(capsys, str(plain["parquet"]), "--out", str(tmp_path / "a"))[0] == 0
    for kind in ("parquet", "jsonl", "arrow-file"):
        rc, err = run(capsys, str(body[kind]), "--out", str(tmp_path / kind), "--text-field", "body")
        assert rc == 0, err
        assert outputs(tmp_path / kind) == outputs(tmp_path / "a")


@pytest.mark.parametrize("kind", ["parquet", "arrow-file", "json", "jsonl"])
def test_missing_text_field_is_one_line_naming_file_field_and_fields(tmp_path, capsys, kind):
    path = write_tables(tmp_path / "src")[kind]
    rc, err = run(capsys, str(path), "--out", str(tmp_path / "out"), "--text-field", "body")
    assert rc == 2 and not (tmp_path / "out").exists()
    assert err.count("\n") == 1 and err.startswith("deepseekmoe: error: ")
    assert path.name in err and "'body'" in err.replace('"', "'") and "id, text" in err


def test_cached_hub_dataset_is_read_offline(tmp_path, capsys, monkeypatch):
    src = write_tables(tmp_path / "src")
    cache = tmp_path / "hf-datasets"
    cache_hub_dataset(cache, "someone/tiny-corpus", {"train": src["parquet"], "validation": src["parquet"]})
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # prepare reads the cache offline by itself
    assert run(capsys, str(src["jsonl"]), "--out", str(tmp_path / "jsonl"))[0] == 0
    for source in ("hf:someone/tiny-corpus", "hf:someone/tiny-corpus:validation"):
        rc, err = run(capsys, source, "--out", str(tmp_path / "hub"), "--force")
        assert rc == 0, err
        assert outputs(tmp_path / "hub") == outputs(tmp_path / "jsonl")
    assert "up to date" in run(capsys, "hf:someone/tiny-corpus:validation", "--out", str(tmp_path / "hub"))[1]
    assert datasets.config.HF_HUB_OFFLINE is False  # restored
    for source, message in (("hf:someone/tiny-corpus:test", 'Unknown split "test"'),
                            ("hf:someone/absent", "it must be in the cache already"),
                            ("hf:someone/tiny-corpus", "has no field 'body'")):
        rc, err = run(capsys, source, "--out", str(tmp_path / "bad"), "--text-field", "body")
        assert rc == 2 and err.count("\n") == 1 and message in err and source in err, err


@pytest.mark.parametrize("case, message", [
    ("parquet-as-text", "is not text (a Parquet file (name it .parquet))"),
    ("nul-bytes", "is not text (it holds NUL bytes)"),
    ("png", "is not text (a PNG image)"),
    ("random", "characters are invalid UTF-8"),
    ("gz-binary", "is not text (it holds NUL bytes)"),
])
def test_binary_files_are_refused(tmp_path, capsys, case, message):
    src = write_tables(tmp_path / "src")
    path = tmp_path / "input.txt"
    if case == "parquet-as-text":
        path.write_bytes(src["parquet"].read_bytes())
    elif case == "nul-bytes":
        path = tmp_path / "weights.bin"
        path.write_bytes(b"some header\x00\x00\x00" + bytes(range(256)) * 4)
    elif case == "png":
        path = tmp_path / "picture"
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"IHDR" * 50)
    elif case == "random":
        path.write_bytes(bytes((i * 131 + 7) % 128 + 128 for i in range(4000)))  # no NUL, none valid UTF-8
    elif case == "gz-binary":
        path = tmp_path / "blob.txt.gz"
        path.write_bytes(gzip.compress(b"\x00\x01\x02" * 100))
    rc, err = run(capsys, str(path), str(src["jsonl"]), "--out", str(tmp_path / "out"))
    assert rc == 2 and err.count("\n") == 1 and message in err and path.name in err, err
    assert not (tmp_path / "out").exists()


def test_text_with_a_few_invalid_bytes_is_still_text(tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes("".join(make_docs(4)).encode() + "café naïve\n".encode("latin-1"))
    (tmp_path / "other.txt").write_text(make_docs(1, start=5)[0])
    rc, err = run(capsys, str(path), str(tmp_path / "other.txt"), "--out", str(tmp_path / "out"))
    assert rc == 0 and "replaced 2 invalid UTF-8 sequence(s)" in err


def test_deeply_nested_jsonl_line_is_one_error(tmp_path, capsys):
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps({"text": "fine document"}) + "\n" + "[" * 200_000 + "]" * 200_000 + "\n")
    rc, err = run(capsys, str(path), "--out", str(tmp_path / "out"))
    assert rc == 2 and err == f"deepseekmoe: error: {path}:2: JSON nested too deeply to read\n"


@pytest.mark.parametrize("kind", ["parquet", "json"])
def test_tables_without_datasets_name_the_extra(tmp_path, capsys, monkeypatch, kind):
    path = write_tables(tmp_path / "src")[kind]
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    rc, err = run(capsys, str(path), "--out", str(tmp_path / "out"))
    assert rc == 2 and err == (f"deepseekmoe: error: reading {path} needs the `datasets` package: "
                               "pip install 'deepseekmoe[data]'\n")
    monkeypatch.undo()
    rc, err = run(capsys, str(path), "--out", str(tmp_path / "out"))  # jsonl needs no datasets; tables do
    assert rc == 0, err


def test_corrupt_table_is_one_line(tmp_path, capsys):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 not really a parquet file PAR1")
    rc, err = run(capsys, str(path), "--out", str(tmp_path / "out"))
    assert rc == 2 and err.startswith(f"deepseekmoe: error: cannot read {path} as parquet: ") and err.count("\n") == 1
