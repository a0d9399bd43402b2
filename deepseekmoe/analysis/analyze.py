"""`deepseekmoe analyze`: routing statistics and the specialization experiments for one or more checkpoints.

Outputs in OUT_DIR:
  analysis.json               everything below, per checkpoint
  <name>_load.png             per-layer expert load histograms (dead experts in red)
  <name>_coactivation.png     per-layer co-activation heatmaps
  fig4_disable_top.png        loss vs ratio of disabled top routed experts, all checkpoints on one plot
  fig5_top_k.png              loss vs number of activated routed experts, all checkpoints on one plot
All losses are over the same fixed validation windows (the first `batches` x `batch_size` sequential windows of
DATA_DIR/val.bin), so numbers are comparable across checkpoints that share a tokenizer.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Callable

from tokenizers import Tokenizer

from ..data.dataset import eval_batches, open_split
from ..errors import UserValueError
from ..filenames import TOKENIZER_FILE
from ..model import Transformer
from .specialization import Batch, disable_top_experts, evaluate_loss, shared_expert_swap, vary_top_k
from .stats import RoutingStats


def validation_batches(data_dir: str | Path, batch_size: int, seq_len: int, num_batches: int) -> list[Batch]:
    """The first `num_batches` sequential windows of the validation split, materialised once."""
    batches = list(eval_batches(open_split(data_dir, "val"), batch_size, seq_len, max_batches=num_batches))
    if not batches:
        raise UserValueError(f"{data_dir}: the validation split holds no window of {seq_len + 1} tokens")
    return batches


def checkpoint_name(ckpt: Path) -> str:
    """'run/step_00000100' for a run's checkpoint, else the directory name."""
    if ckpt.parent.name == "checkpoints":
        return f"{ckpt.parent.parent.name}/{ckpt.name}"
    return ckpt.name


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "checkpoint"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def token_decoder(ckpt: Path, data_dir: Path) -> Callable[[int], str] | None:
    """Token id -> text with the checkpoint's tokenizer; refuses a data dir made with a different one."""
    own, data_tok = ckpt / TOKENIZER_FILE, data_dir / TOKENIZER_FILE
    if own.is_file() and data_tok.is_file() and _sha256(own) != _sha256(data_tok):
        raise UserValueError(f"{ckpt} was trained with a different tokenizer than {data_dir}")
    path = own if own.is_file() else data_tok if data_tok.is_file() else None
    if path is None:
        return None
    tok = Tokenizer.from_file(str(path))
    return lambda i: tok.decode([i], skip_special_tokens=False)


def analyze_model(model: Transformer, batches: list[Batch], decode: Callable[[int], str] | None = None,
                  top_tokens: int = 10, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Routing statistics on the normal forward, then the specialization experiments where they apply."""
    cfg = model.config
    stats = RoutingStats(cfg.n_routed_experts or 0, cfg.num_moe_layers, cfg.vocab_size)
    on_output = (lambda out, ids: stats.update(out.router_outputs, ids)) if cfg.is_moe else None
    base = evaluate_loss(model, batches, on_output)
    result: dict[str, Any] = {
        "router": cfg.router, "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok if cfg.is_moe else None,
        "val_loss": base, "val_tokens": sum(t.numel() for _, t in batches),
        "layers": stats.summary(decode, top_tokens) if cfg.is_moe else [],
    }
    log(f"  validation loss {base:.4f} on {result['val_tokens']} tokens")
    if not cfg.is_moe or cfg.router == "hash":
        result["skipped"] = "no routing probabilities to re-rank (dense or hash model)"
        return result
    result["disable_top"] = disable_top_experts(model, batches)
    log("  disable top experts: " + ", ".join(f"{r['ratio_label']}->{r['loss']:.3f}" for r in result["disable_top"]))
    result["top_k"] = vary_top_k(model, batches)
    log("  activated experts: " + ", ".join(f"K={r['top_k']}->{r['loss']:.3f}" for r in result["top_k"]))
    if cfg.n_shared_experts > 0 and cfg.num_experts_per_tok < (cfg.n_routed_experts or 0):
        result["shared_swap"] = shared_expert_swap(model, batches, baseline=base)
        log(f"  shared off + one more routed: {result['shared_swap']['swapped_loss']:.4f}")
    return result


def write_routing_plots(results: list[dict[str, Any]], out: Path) -> dict[str, str]:
    """Draw every plot of an analysis.json's checkpoints; returns {plot name: file name}."""
    from . import plots  # matplotlib is imported only when plotting

    files: dict[str, str] = {}
    for r in results:
        if r["layers"]:
            slug = _slug(r["name"])
            files[f"{r['name']} load"] = plots.load_histograms(r["layers"], out / f"{slug}_load.png",
                                                                f"Expert load: {r['name']}").name
            files[f"{r['name']} co-activation"] = plots.coactivation_heatmaps(
                r["layers"], out / f"{slug}_coactivation.png", f"Co-activation P(j | i): {r['name']}").name
    fig4 = {r["name"]: r["disable_top"] for r in results if r.get("disable_top")}
    if fig4:
        files["fig4"] = plots.disable_top_curve(fig4, out / "fig4_disable_top.png").name
    fig5 = {r["name"]: r["top_k"] for r in results if r.get("top_k")}
    if fig5:
        refs = {f"{r['name']} (full model)": r["val_loss"] for r in results if not r.get("top_k")}
        files["fig5"] = plots.topk_curve(fig5, out / "fig5_top_k.png", refs).name
    return files
