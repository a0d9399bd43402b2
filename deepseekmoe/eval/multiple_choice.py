"""Multiple-choice scoring by continuation log-likelihood (HellaSwag, PIQA, ARC, WinoGrande style).

Each example becomes a list of (context, continuation) pairs and a gold index. A choice's score is the sum of the
log-probabilities of its continuation tokens given its context:
  acc       argmax of the summed log-probability
  acc_norm  argmax of the summed log-probability divided by the continuation's length in UTF-8 bytes
WinoGrande-style items (a sentence with "_" and two options) substitute each option into the prefix and score the
shared remainder, so the contexts differ and the continuation is the same.

Local JSONL formats recognised (one object per line):
  generic     {"context": str, "choices": [str, ...], "label": int}
  HellaSwag   {"ctx": str, "endings": [str, ...], "label": int|str}
  PIQA        {"goal": str, "sol1": str, "sol2": str, "label": int}
  ARC         {"question": str, "choices": {"text": [...], "label": [...]}, "answerKey": str}
  WinoGrande  {"sentence": str with one "_", "option1": str, "option2": str, "answer": "1"|"2"}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..model import Transformer


@dataclass
class Example:
    requests: list[tuple[str, str]]
    """(context, continuation) per choice."""
    label: int


def _generic(d: dict[str, Any]) -> Example:
    return Example([(d["context"], " " + c.lstrip()) for c in d["choices"]], int(d["label"]))


def _hellaswag(d: dict[str, Any]) -> Example:
    return Example([(d["ctx"], " " + e.lstrip()) for e in d["endings"]], int(d["label"]))


def _piqa(d: dict[str, Any]) -> Example:
    ctx = f"Question: {d['goal']}\nAnswer:"
    return Example([(ctx, " " + d["sol1"]), (ctx, " " + d["sol2"])], int(d["label"]))


def _arc(d: dict[str, Any]) -> Example:
    ctx = f"Question: {d['question']}\nAnswer:"
    labels = list(d["choices"]["label"])
    return Example([(ctx, " " + t) for t in d["choices"]["text"]], labels.index(d["answerKey"]))


def _winogrande(d: dict[str, Any]) -> Example:
    prefix, suffix = d["sentence"].split("_", 1)
    cont = " " + suffix.strip()
    return Example([(prefix + d["option1"], cont), (prefix + d["option2"], cont)], int(d["answer"]) - 1)


_FORMATS: list[tuple[set[str], Callable[[dict[str, Any]], Example]]] = [
    ({"context", "choices", "label"}, _generic),
    ({"ctx", "endings", "label"}, _hellaswag),
    ({"goal", "sol1", "sol2", "label"}, _piqa),
    ({"question", "choices", "answerKey"}, _arc),
    ({"sentence", "option1", "option2", "answer"}, _winogrande),
]


def parse_example(d: dict[str, Any]) -> Example:
    for keys, parse in _FORMATS:
        if keys <= d.keys():
            return parse(d)
    raise ValueError(f"unrecognised multiple-choice item with keys {sorted(d)}; expected one of "
                     + "; ".join("+".join(sorted(k)) for k, _ in _FORMATS))


def load_task(path: str | Path) -> list[Example]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"task file not found: {p}")
    examples = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                examples.append(parse_example(json.loads(line)))
            except (json.JSONDecodeError, KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"{p}:{n}: {exc}") from None
    if not examples:
        raise ValueError(f"{p}: no examples")
    return examples


def _split_tokens(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids; the continuation is cut from the joint encoding when the context is a prefix."""
    ctx = encode(context)
    whole = encode(context + continuation)
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, encode(continuation)


def loglikelihoods(model: Transformer, encode: Callable[[str], list[int]], requests: Sequence[tuple[str, str]],
                   bos_token_id: int | None = None, batch_size: int = 8,
                   max_length: int | None = None,
                   progress: Callable[[int], object] | None = None) -> list[tuple[float, bool]]:
    """For each (context, continuation): (sum of continuation log-probs, whether it is the greedy continuation).

    bos (if given) is prepended to the context; sequences are left-truncated to max_length positions (default
    max_position_embeddings), so a continuation longer than that is scored on its last max_length tokens.
    `progress` is passed on to score_tokens.
    """
    max_len = max_length or model.config.max_position_embeddings
    items = []
    for context, continuation in requests:
        ctx, cont = _split_tokens(encode, context, continuation)
        ids = ([bos_token_id] if bos_token_id is not None else []) + ctx + cont
        if len(cont) == 0:
            raise ValueError(f"empty continuation for context {context[:40]!r}")
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


def evaluate_multiple_choice(model: Transformer, encode: Callable[[str], list[int]], examples: list[Example],
                             bos_token_id: int | None = None, batch_size: int = 8) -> dict[str, float]:
    """acc and acc_norm (length-normalised by continuation bytes) over the examples."""
    flat = [r for ex in examples for r in ex.requests]
    scores = [s for s, _ in loglikelihoods(model, encode, flat, bos_token_id, batch_size)]
    correct = correct_norm = 0
    pos = 0
    for ex in examples:
        n = len(ex.requests)
        s = scores[pos:pos + n]
        norm = [v / max(1, len(cont.encode("utf-8"))) for v, (_, cont) in zip(s, ex.requests)]
        correct += int(max(range(n), key=s.__getitem__) == ex.label)
        correct_norm += int(max(range(n), key=norm.__getitem__) == ex.label)
        pos += n
    return {"acc": correct / len(examples), "acc_norm": correct_norm / len(examples), "examples": len(examples)}
