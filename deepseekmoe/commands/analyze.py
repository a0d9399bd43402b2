"""`deepseekmoe analyze`: routing statistics and the paper's specialization experiments for checkpoints."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..analysis.analyze import analyze_model, checkpoint_name, token_decoder, validation_batches, write_routing_plots
from ..analysis.results import ANALYSIS_JSON, write_json
from ..convert.load import load_model
from ..data.builtin_cache import ensure_builtin_data
from ..fileio import check_output_dir


def analyze_command(checkpoints: list[str], *, data: str | None = None, out: str = "analysis",
                    batches: int = 16, batch_size: int = 8, seq_len: int = 256, top_tokens: int = 10) -> int:
    """Routing statistics and the paper's expert-specialization experiments (Figs. 4-5) for checkpoints.

    Args:
        checkpoints: checkpoint directories or run directories (a run's latest checkpoint is used).
        data: prepared data directory whose validation split is evaluated (default: the built-in corpus).
        out: output directory for analysis.json and the PNG plots.
        batches: number of validation batches (the same fixed windows for every checkpoint and experiment).
        batch_size: sequences per batch.
        seq_len: tokens per window (capped at each model's max_position_embeddings).
        top_tokens: tokens listed per expert.
    """
    out_dir = check_output_dir(out)
    data_dir = Path(data) if data else _builtin_data()
    models = [load_model(c) for c in checkpoints]  # fail early, before any long work, on a bad path
    decoders = [token_decoder(ckpt, data_dir) for _, ckpt in models]  # ... or on a tokenizer mismatch
    length = min([seq_len] + [m.config.max_position_embeddings for m, _ in models])
    val = validation_batches(data_dir, batch_size, length, batches)
    results = []
    for i, ((model, ckpt), decode) in enumerate(zip(models, decoders)):
        name = checkpoint_name(ckpt)
        print(f"[{i + 1}/{len(models)}] {name}", file=sys.stderr, flush=True)
        torch.manual_seed(0)
        r = analyze_model(model, val, decode, top_tokens, log=lambda s: print(s, file=sys.stderr, flush=True))
        results.append({"name": name, "checkpoint": str(ckpt), **r})
    out_dir.mkdir(parents=True, exist_ok=True)  # only now: a bad argument leaves nothing behind
    files = write_routing_plots(results, out_dir)
    write_json(out_dir / ANALYSIS_JSON, {"data": str(data_dir), "seq_len": length, "batches": len(val),
                                            "checkpoints": results, "plots": files})
    print(f"wrote {out_dir / 'analysis.json'} and {len(files)} plots", file=sys.stderr)
    return 0


def _builtin_data() -> Path:
    return Path(ensure_builtin_data())
