"""Helpers for the training tests: a tiny data directory following the data contract, and tiny run overrides."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from deepseekmoe.data.tokenizer import train_tokenizer

WORDS = ("def return self import class value print list dict for while if else the of and to in is "
         "a an with not None True False").split()


def _documents(count: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 60)))) for _ in range(count)]


def make_data_dir(root: Path, train_docs: int = 120, val_docs: int = 20, vocab_size: int = 300) -> Path:
    """meta.json + tokenizer.json + train.bin/val.bin (uint16; each document is bos + tokens + eos)."""
    root.mkdir(parents=True, exist_ok=True)
    docs = {"train": _documents(train_docs, 1), "val": _documents(val_docs, 2)}
    tok = train_tokenizer(docs["train"], vocab_size)
    tok.save(str(root / "tokenizer.json"))
    bos, eos, pad = (tok.token_to_id(t) for t in ("<|bos|>", "<|eos|>", "<|pad|>"))
    splits = {}
    for split, texts in docs.items():
        ids: list[int] = []
        for text in texts:
            ids += [bos, *tok.encode(text, add_special_tokens=False).ids, eos]
        np.asarray(ids, dtype=np.uint16).tofile(root / f"{split}.bin")
        splits[split] = {"tokens": len(ids), "bytes": sum(len(t.encode()) for t in texts), "documents": len(texts)}
    meta = {"format": 1, "vocab_size": tok.get_vocab_size(), "dtype": "uint16", "bos_token_id": bos,
            "eos_token_id": eos, "pad_token_id": pad,
            "tokenizer_sha256": hashlib.sha256((root / "tokenizer.json").read_bytes()).hexdigest(),
            "sources": ["synthetic"], "splits": splits}
    (root / "meta.json").write_text(json.dumps(meta, indent=2))
    return root


TINY_MODEL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                  intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
                  num_experts_per_tok=2)
TINY_TRAIN = dict(seq_len=32, batch_size=4, max_steps=6, warmup_steps=2, log_every=1, eval_every=0,
                  eval_batches=2, save_every=3, keep_last=5, sample_tokens=0, tensorboard=False, device="cpu",
                  lr=3e-3)


def tiny_overrides(**train: object) -> list[str]:
    """key=value overrides for a seconds-long CPU run of a tiny DeepSeekMoE."""
    model = [f"model.{k}={v}" for k, v in TINY_MODEL.items()]
    return model + [f"train.{k}={v}" for k, v in {**TINY_TRAIN, **train}.items()]


def read_metrics(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]
