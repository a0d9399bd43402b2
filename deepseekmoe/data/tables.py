"""Documents from tables read through HF `datasets`: local Parquet, Arrow and JSON files, and hub datasets in the
local cache (`hf:NAME[:SPLIT]`, read offline: nothing is downloaded).

Each row's text field (`--text-field`, default "text") is one document, in the file's row order. Local files are
streamed in batches (nothing is copied into the datasets cache); a cached hub dataset is read from its memory-mapped
Arrow files. `datasets` is optional: without it these inputs are one error naming the package and the extra.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator
from ..errors import UserValueError

HUB_PREFIX = "hf:"
BATCH_ROWS = 1024


def import_datasets(what: str) -> Any:
    """The `datasets` module, or ValueError (one line) saying how to install it."""
    try:
        import datasets
    except ImportError:
        raise UserValueError(f"reading {what} needs the `datasets` package: pip install 'deepseekmoe[data]'") from None
    return datasets


@contextlib.contextmanager
def _quiet(datasets: Any) -> Iterator[None]:
    """Without datasets' log lines (notes on using the cache; errors are reported once, by the caller)."""
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)


@contextlib.contextmanager
def _offline(datasets: Any) -> Iterator[None]:
    """Hub datasets come from the local cache only, whatever the environment says."""
    saved = datasets.config.HF_HUB_OFFLINE, os.environ.get("HF_DATASETS_OFFLINE")
    datasets.config.HF_HUB_OFFLINE = True
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        with _quiet(datasets):
            yield
    finally:
        datasets.config.HF_HUB_OFFLINE = saved[0]
        if saved[1] is None:
            os.environ.pop("HF_DATASETS_OFFLINE", None)
        else:
            os.environ["HF_DATASETS_OFFLINE"] = saved[1]


def parse_hub_source(source: str) -> tuple[str, str]:
    """`hf:NAME[:SPLIT]` -> (NAME, SPLIT); the split defaults to train."""
    name, _, split = source[len(HUB_PREFIX):].partition(":")
    if not name:
        raise UserValueError(f"{source}: expected hf:NAME or hf:NAME:SPLIT (a dataset in the local HF cache)")
    return name, split or "train"


def load_hub(source: str) -> Any:
    """The cached hub dataset a `hf:` source names (a datasets.Dataset), loaded offline."""
    datasets = import_datasets(source)
    name, split = parse_hub_source(source)
    with _offline(datasets):
        try:
            return datasets.load_dataset(name, split=split)
        except (ConnectionError, FileNotFoundError, ValueError, KeyError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            hint = "" if isinstance(exc, (ValueError, KeyError)) else (
                "; it must be in the cache already (load it once with datasets.load_dataset while online, or "
                "set HF_DATASETS_CACHE)")
            raise UserValueError(f"{source}: cannot load it from the local datasets cache "
                             f"{datasets.config.HF_DATASETS_CACHE} ({reason}){hint}") from None


def hub_identity(source: str) -> str:
    """What identifies a cached hub dataset's content for the no-op check: its datasets fingerprint."""
    return load_hub(source)._fingerprint


class FieldError(UserValueError):
    """A row without the text field, or whose text field is not a string."""


def _check_field(where: str, columns: list[str], field: str) -> None:
    if field not in columns:
        raise FieldError(f"{where} has no field {field!r} (choose one with --text-field); its fields: "
                         + (", ".join(columns) or "none"))


def _texts(where: str, batches: Iterator[dict[str, list]], field: str) -> Iterator[str]:
    row = 0
    for batch in batches:
        _check_field(where, list(batch), field)
        for value in batch[field]:
            row += 1
            if not isinstance(value, str):
                raise FieldError(f"{where}: row {row}: field {field!r} is {type(value).__name__}, not a string")
            if value.strip():
                yield value


def table_documents(path: Path, builder: str, field: str) -> Iterator[str]:
    """The text field of every row of a local file, streamed by the datasets builder named `builder` (parquet,
    arrow or json)."""
    datasets = import_datasets(str(path))
    try:
        with _quiet(datasets):
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
            if ds.features is not None:
                _check_field(str(path), list(ds.features), field)
            yield from _texts(str(path), ds.iter(batch_size=BATCH_ROWS), field)
    except FieldError:
        raise
    except Exception as exc:  # pyarrow's and datasets' many parse errors: the file is not what its name says
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserValueError(f"cannot read {path} as {builder}: {reason}") from None


def hub_documents(source: str, field: str) -> Iterator[str]:
    """The text field of every row of a cached hub dataset's split."""
    ds = load_hub(source)
    _check_field(source, list(ds.column_names), field)
    yield from _texts(source, ds.select_columns([field]).iter(batch_size=BATCH_ROWS), field)
