"""Multiple-choice scoring by continuation log-likelihood (HellaSwag, PIQA, ARC, WinoGrande style), by
lm-evaluation-harness's rules, so `deepseekmoe eval --task` and `lm_eval` give the same numbers on the same items.

Each example becomes one (context, continuation) request per choice and a gold index:
  requests    (context, target_delimiter + choice); WinoGrande-style items substitute each option into the
              sentence's prefix and share the continuation target_delimiter + the rest of the sentence, stripped
  tokens      trailing whitespace of the context moves to the front of the continuation; context + continuation is
              encoded as one string and the continuation is what follows the context's own encoding; bos (eos when
              the model has none) is prepended to the context
  acc         argmax of the summed continuation log-probabilities
  acc_norm    argmax of the sums divided by each choice's length in characters (the choice without the delimiter;
              for WinoGrande the filled-in prefix, as lm-eval does)
  acc_bytes   the same divided by the choice's length in UTF-8 bytes
The first of equal scores wins.

Local JSONL formats recognised (one object per line):
  generic     {"context": str, "choices": [str, ...], "label": int}
  HellaSwag   {"ctx": str, "endings": [str, ...], "label": int|str}; with "activity_label", "ctx_a" and "ctx_b"
              (the released dataset's rows) the context and endings are cleaned as lm-eval's hellaswag task does
  PIQA        {"goal": str, "sol1": str, "sol2": str, "label": int}
  ARC         {"question": str, "choices": {"text": [...], "label": [...]}, "answerKey": str}
  WinoGrande  {"sentence": str with one "_", "option1": str, "option2": str, "answer": "1"|"2"}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import UserValueError
from ..model import Transformer

TARGET_DELIMITER = " "


@dataclass
class Example:
    requests: list[tuple[str, str]]
    """(context, continuation) per choice."""
    label: int
    choices: list[str]
    """The text each choice's score is normalised by (acc_norm: characters, acc_bytes: UTF-8 bytes)."""


def _choices_after(context: str, choices: list[str], label: int, delimiter: str) -> Example:
    return Example([(context, delimiter + c) for c in choices], label, list(choices))


def _generic(d: dict[str, Any], delimiter: str) -> Example:
    return _choices_after(d["context"], d["choices"], int(d["label"]), delimiter)


def _clean_hellaswag(text: str) -> str:
    """lm-eval's hellaswag cleaning: strip, WikiHow "[title]" markers become sentence ends, other [tags] go."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(d: dict[str, Any], delimiter: str) -> Example:
    if {"activity_label", "ctx_a", "ctx_b"} <= d.keys():
        context = _clean_hellaswag(f"{d['activity_label']}: {d['ctx_a']} {d['ctx_b'].capitalize()}")
        return _choices_after(context, [_clean_hellaswag(e) for e in d["endings"]], int(d["label"]), delimiter)
    return _choices_after(d["ctx"], d["endings"], int(d["label"]), delimiter)


def _piqa(d: dict[str, Any], delimiter: str) -> Example:
    return _choices_after(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], int(d["label"]), delimiter)


def _arc(d: dict[str, Any], delimiter: str) -> Example:
    labels = list(d["choices"]["label"])
    return _choices_after(f"Question: {d['question']}\nAnswer:", list(d["choices"]["text"]),
                          labels.index(d["answerKey"]), delimiter)


def _winogrande(d: dict[str, Any], delimiter: str) -> Example:
    cut = d["sentence"].index("_")
    prefix, rest = d["sentence"][:cut], d["sentence"][cut + 1:]
    contexts = [prefix + d["option1"], prefix + d["option2"]]
    cont = delimiter + rest.strip()
    return Example([(c, cont) for c in contexts], int(d["answer"]) - 1, contexts)


_FORMATS: list[tuple[set[str], Callable[[dict[str, Any], str], Example]]] = [
    ({"context", "choices", "label"}, _generic),
    ({"ctx", "endings", "label"}, _hellaswag),
    ({"goal", "sol1", "sol2", "label"}, _piqa),
    ({"question", "choices", "answerKey"}, _arc),
    ({"sentence", "option1", "option2", "answer"}, _winogrande),
]


def parse_example(d: dict[str, Any], target_delimiter: str = TARGET_DELIMITER) -> Example:
    for keys, parse in _FORMATS:
        if keys <= d.keys():
            example = parse(d, target_delimiter)
            if not 0 <= example.label < len(example.requests):
                raise UserValueError(f"label {example.label} is not the index of one of {len(example.requests)} "
                                     f"choices")
            return example
    raise UserValueError(f"unrecognised multiple-choice item with keys {sorted(d)}; expected one of "
                     + "; ".join("+".join(sorted(k)) for k, _ in _FORMATS))


def load_task(path: str | Path, target_delimiter: str = TARGET_DELIMITER) -> list[Example]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"task file not found: {p}")
    examples = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                examples.append(parse_example(json.loads(line), target_delimiter))
            except (json.JSONDecodeError, KeyError, IndexError, ValueError, TypeError, AttributeError) as exc:
                raise UserValueError(f"{p}:{n}: {exc}") from None
    if not examples:
        raise UserValueError(f"{p}: no examples")
    return examples


def prefix_token_id(config: ModelConfig) -> int | None:
    """The token every context is conditioned on: bos, or eos for a model without one."""
    return config.bos_token_id if config.bos_token_id is not None else config.eos_token_id


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids by lm-eval's rule: the context's trailing whitespace moves to the
    continuation, the joint string is encoded once and the continuation is what follows the context's tokens."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    ctx = encode(stripped)
    return ctx, encode(stripped + continuation)[len(ctx):]


def loglikelihoods(model: Transformer, encode: Callable[[str], list[int]], requests: Sequence[tuple[str, str]],
                   bos_token_id: int | None = None, batch_size: int = 8,
                   max_length: int | None = None,
                   progress: Callable[[int], object] | None = None) -> list[tuple[float, bool]]:
    """For each (context, continuation): (sum of continuation log-probs, whether it is the greedy continuation).

    Tokens come from encode_pair; bos (if given) is prepended to the context; sequences are left-truncated to
    max_length positions (default max_position_embeddings), so a continuation longer than that is scored on its
    last max_length tokens. `progress` is passed on to score_tokens.
    """
    max_len = max_length or model.config.max_position_embeddings
    items = []
    for context, continuation in requests:
        ctx, cont = encode_pair(encode, context, continuation)
        if len(cont) == 0:
            raise UserValueError(f"empty continuation {continuation!r} for context {context[:40]!r}")
        ids = ([bos_token_id] if bos_token_id is not None else []) + ctx + cont
        ids = ids[-(max_len + 1):]
        items.append((ids, min(len(cont), len(ids) - 1)))
    return score_tokens(model, items, batch_size, progress)


@torch.no_grad()
def score_tokens(model: Transformer, items: Sequence[tuple[list[int], int]], batch_size: int = 8,
                 progress: Callable[[int], object] | None = None) -> list[tuple[float, bool]]:
    """For each (ids, n): (sum of the log-probs of the last n ids given all ids before them, whether every one of
    them is the model's argmax), in the order given.

    The model sees ids[:-1]. Items are batched longest first (less padding; an out-of-memory shows up in the
    first batch); `progress`, when given, is called with the number of items each finished batch held.
    """
    device = model.embed_tokens.weight.device
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(items)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(items[i][0]) - 1 for i in chunk)
        batch = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, i in enumerate(chunk):
            ids = items[i][0]
            batch[row, :len(ids) - 1] = torch.tensor(ids[:-1])
        logprobs = model(batch.to(device)).logits.float().log_softmax(-1).cpu()
        for row, i in enumerate(chunk):
            ids, n = items[i]
            end = len(ids) - 1
            lp = logprobs[row, end - n:end]
            target = torch.tensor(ids[len(ids) - n:])
            results[i] = (lp.gather(-1, target[:, None]).sum().item(), bool(torch.equal(lp.argmax(-1), target)))
        if progress is not None:
            progress(len(chunk))
    return results


def predictions(lls: Sequence[float], choices: Sequence[str]) -> dict[str, int]:
    """Index of the chosen choice by raw sum (acc), per character (acc_norm) and per UTF-8 byte (acc_bytes)."""
    scores = np.asarray(lls, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):  # an empty choice divides by zero, as in lm-eval
        return {"acc": int(np.argmax(scores)),
                "acc_norm": int(np.argmax(scores / np.array([float(len(c)) for c in choices]))),
                "acc_bytes": int(np.argmax(scores / np.array([float(len(c.encode("utf-8"))) for c in choices])))}


def score_examples(model: Transformer, encode: Callable[[str], list[int]], examples: list[Example],
                   bos_token_id: int | None = None, batch_size: int = 8) -> list[dict[str, Any]]:
    """One record per example: its requests, per-choice log-likelihoods, label, predictions and 0/1 metrics."""
    flat = [r for ex in examples for r in ex.requests]
    scores = [s for s, _ in loglikelihoods(model, encode, flat, bos_token_id, batch_size)]
    records, pos = [], 0
    for doc_id, ex in enumerate(examples):
        lls = scores[pos:pos + len(ex.requests)]
        pos += len(ex.requests)
        pred = predictions(lls, ex.choices)
        records.append({"doc_id": doc_id, "arguments": [list(r) for r in ex.requests], "loglikelihoods": lls,
                        "label": ex.label, "pred": pred, **{k: float(v == ex.label) for k, v in pred.items()}})
    return records


def accuracies(records: list[dict[str, Any]]) -> dict[str, float]:
    """acc, acc_norm and acc_bytes (means over the examples of score_examples) and the number of examples."""
    n = len(records)
    return {**{k: sum(r[k] for r in records) / n for k in ("acc", "acc_norm", "acc_bytes")}, "examples": n}
