"""`deepseekmoe eval`: a checkpoint on held-out text (loss, perplexity, bits per byte) or a multiple-choice task.

The held-out text is the data directory the run recorded (its config.yaml), or the one given."""

from __future__ import annotations

import json as jsonlib
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..configio import read_mapping
from ..data.builtin_cache import ensure_builtin_data
from ..data.dataset import open_split
from ..errors import UserValueError
from ..eval.multiple_choice import accuracies, load_task, prefix_token_id, score_examples
from ..eval.perplexity import evaluate, token_byte_lengths
from ..filenames import RUN_CONFIG_FILE, TOKENIZER_FILE
from ..inference.loading import load_for_inference


def _run_dir_of(path: Path, ckpt: Path) -> Path:
    """The run directory a checkpoint belongs to (RUN_DIR/checkpoints/step_*), or the path given."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else path


def run_config(run_dir: Path) -> dict | None:
    """RUN_DIR/config.yaml as the trainer wrote it (keys preset, data, out, model, train), if there is one."""
    path = run_dir / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    return read_mapping(path)


def recorded_data(run: dict | None) -> Path:
    """The data directory a run trained on: its `data`, or the built-in corpus when that is null (as the trainer
    resolves it)."""
    if run is None:
        raise UserValueError("no run config.yaml records the training data; pass --data DATA_DIR_OR_TEXT_FILE")
    if run.get("data"):
        return Path(str(run["data"]))
    return Path(ensure_builtin_data())


def _check_same_tokenizer(data_dir: Path, tokenizer: Tokenizer) -> None:
    data_tokenizer = data_dir / TOKENIZER_FILE
    if data_tokenizer.is_file() and Tokenizer.from_file(str(data_tokenizer)).get_vocab() != tokenizer.get_vocab():
        raise UserValueError(f"{data_dir} was tokenized with a different tokenizer than the checkpoint's")


def heldout_tokens(data: Path, tokenizer: Tokenizer, bos_token_id: int | None,
                   eos_token_id: int | None) -> np.ndarray:
    """The val split of a prepared data directory, or a text file tokenized as one document (bos + text + eos)."""
    if data.is_dir():
        _check_same_tokenizer(data, tokenizer)
        return open_split(data, "val")
    if not data.is_file():
        raise FileNotFoundError(f"no such data directory or text file: {data}")
    text = data.read_text(encoding="utf-8", errors="replace")
    if not text:
        raise UserValueError(f"{data} is empty: there is no text to evaluate")
    bos = [bos_token_id] if bos_token_id is not None else []
    eos = [eos_token_id] if eos_token_id is not None else []
    return np.asarray(bos + tokenizer.encode(text, add_special_tokens=False).ids + eos, dtype=np.int64)


def eval_command(checkpoint: str, *, data: str | None = None, task: str | None = None, json: bool = False,
                 batch_size: int = 8, seq_len: int | None = None, max_batches: int | None = None,
                 device: str | None = None, target_delimiter: str = " ", samples: str | None = None,
                 quantize: str | None = None) -> int:
    """Evaluate a trained model on held-out text: loss (nats/token), perplexity and bits per byte; or, with
    --task, multiple-choice accuracy (acc, acc_norm per character, acc_bytes per byte) on a local JSONL task,
    scored by lm-evaluation-harness's rules (deepseekmoe/eval/multiple_choice.py), so the numbers equal
    `lm_eval`'s on the same items.

    The held-out token stream is cut into consecutive windows of --seq-len tokens (the trainer's validation
    windows); every token after the first is predicted once, up to the last full window. Bits per byte divides
    the summed loss by the UTF-8 bytes of the predicted tokens (special tokens count 0 bytes).

    Args:
        checkpoint: a checkpoint directory, or a run directory (its latest checkpoint is used)
        data: a prepared data directory (its val split is used) or a plain text file; default: the data
            directory recorded in the run's config.yaml
        task: a multiple-choice JSONL file (HellaSwag, PIQA, ARC, WinoGrande or generic
            {"context", "choices", "label"} items) scored by continuation log-likelihood
        target_delimiter: with --task, the text between the context and each choice (lm-eval's
            target_delimiter, default one space)
        samples: with --task, also write one JSON line per item (its requests, per-choice log-likelihoods,
            label, predictions) to this file
        json: print one JSON object (loss, perplexity, bits_per_byte, tokens, bytes) instead of text
        batch_size: windows per forward pass (default 8)
        seq_len: tokens of context per window (default: the run's training sequence length, else the model's
            max_position_embeddings)
        max_batches: evaluate only the first N batches
        device: cpu, cuda, cuda:1, ... (default: cuda when available)
        quantize: int8 or int4: quantize a float checkpoint or HF directory while loading it (CPU; a
            checkpoint written by `convert --quantize` runs quantized without it)
    """
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("max_batches", max_batches)):
        if value is not None and value < 1:
            raise UserValueError(f"--{name.replace('_', '-')}={value} must be >= 1")
    model, tokenizer, ckpt = load_for_inference(checkpoint, device, quantize)
    if task is not None:
        return _task_command(model, tokenizer, task, batch_size, json, target_delimiter, samples)
    run = run_config(_run_dir_of(Path(checkpoint), ckpt))
    data_path = Path(data) if data else recorded_data(run)
    tokens = heldout_tokens(data_path, tokenizer, model.config.bos_token_id, model.config.eos_token_id)
    trained_seq_len = ((run or {}).get("train") or {}).get("seq_len")
    seq_len = seq_len or int(trained_seq_len or model.config.max_position_embeddings)
    result = evaluate(model, tokens, token_byte_lengths(tokenizer), batch_size=batch_size, seq_len=seq_len,
                      max_batches=max_batches, progress=not json)
    if json:
        print(jsonlib.dumps(result.to_dict()))
    else:
        print(f"loss           {result.loss:.4f} nats/token\nperplexity     {result.perplexity:.3f}\n"
              f"bits per byte  {result.bits_per_byte:.4f}\ntokens         {result.tokens} ({result.bytes} bytes)")
    return 0


def _task_command(model, tokenizer, task: str, batch_size: int, as_json: bool, target_delimiter: str,
                  samples: str | None) -> int:
    examples = load_task(task, target_delimiter)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    records = score_examples(model, encode, examples, prefix_token_id(model.config), batch_size)
    result = accuracies(records)
    if samples is not None:
        Path(samples).write_text("".join(jsonlib.dumps(r) + "\n" for r in records), encoding="utf-8")
    if as_json:
        print(jsonlib.dumps({"task": task, **result}))
    else:
        print(f"acc        {result['acc']:.4f}\nacc_norm   {result['acc_norm']:.4f}\n"
              f"acc_bytes  {result['acc_bytes']:.4f}\nexamples   {result['examples']}")
    return 0
