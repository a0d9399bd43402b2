"""`deepseekmoe plan`: per-GPU memory, all-to-all bytes and step time of a cluster run, on paper."""

from __future__ import annotations

import json as jsonlib
import math
from dataclasses import asdict

from ..distributed.planner import Plan, fewest_gpus, plan
from ..units import parse_bytes
from ..errors import UserError
from .info import model_config, print_rows


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _rows(p: Plan, name: str) -> list[tuple[str, str]]:
    rows = [("model", name), ("layout", f"{p.gpus} GPU(s) = dp {p.dp} x ep {p.ep}, {p.dtype}"
                              + (", inference" if p.inference else "")),
            ("params per GPU", f"{p.params_per_gpu:,} ({p.params_per_gpu / 1e9:.2f}B)")]
    for flag, words in ((p.fsdp, ", FSDP2"), (p.recompute, ", activation recomputation")):
        if flag:
            rows[1] = ("layout", rows[1][1] + words)
    rows += [(f"  {k}", _gb(v)) for k, v in p.memory.items()]
    verdict = "fits" if p.fits else "does NOT fit"
    rows.append(("memory per GPU", f"{_gb(p.total_memory)} of {_gb(p.gpu_memory)}: {verdict}"))
    if not p.inference:
        rows += [("tokens per step", f"{p.tokens_per_step:,} ({p.micro_batch} x {p.seq_len} per GPU"
                                     f" x {p.gpus} GPUs x {p.grad_accum} accumulation)"),
                 ("all-to-all per GPU", f"{_gb(p.all_to_all_bytes)}/step, {p.all_to_all_s * 1e3:.1f} ms"),
                 ("FSDP gather/scatter per GPU", f"{_gb(p.shard_bytes)}/step, {p.shard_s * 1e3:.1f} ms")
                 if p.fsdp else
                 ("grad all-reduce per GPU", f"{_gb(p.all_reduce_bytes)}/step, {p.all_reduce_s * 1e3:.1f} ms"),
                 ("compute", f"{p.compute_s * 1e3:.1f} ms"),
                 ("step time (no overlap)", f"{p.step_s * 1e3:.1f} ms")]
    return rows


def plan_command(*, preset: str | None = None, config: str | None = None, gpus: int = 1,
                 gpu_memory: str = "80GB", ep: int = 1, micro_batch: int = 1, seq_len: int | None = None,
                 dtype: str = "bf16", flops: float = 989e12, link_bandwidth: str = "400GB/s",
                 global_batch: int | None = None, inference: bool = False, recompute: bool = False,
                 fsdp: bool = False, fit: bool = False, json: bool = False) -> int:
    """Estimate per-GPU memory, all-to-all traffic and step time of a run before renting the GPUs.

    Assumes the layout `torchrun ... train --ep E` runs: dense part replicated (DDP), routed experts split over
    ep GPUs, AdamW with fp32 master weights and moments, no activation recomputation, flash attention; with
    --fsdp, FSDP2 shards the dense part over all GPUs and each expert block over its dp GPUs.

    Args:
        preset: a preset name, e.g. deepseekmoe-16b.
        config: a YAML/JSON ModelConfig file or an HF config.json.
        gpus: number of GPUs (G = dp x ep).
        gpu_memory: memory of one GPU, e.g. 80GB, 40GiB (GB = 10^9 bytes).
        ep: expert-parallel degree; divides gpus, at most n_routed_experts.
        micro_batch: sequences per GPU per forward/backward.
        seq_len: tokens per sequence (default: max_position_embeddings).
        dtype: weight/activation dtype: bf16, fp16 or fp32.
        flops: achievable FLOP/s of one GPU (default: H100 dense bf16 peak).
        link_bandwidth: per-GPU bandwidth for all-to-all and all-reduce, e.g. 400GB/s.
        global_batch: sequences per optimizer step (sets gradient accumulation).
        inference: weights + KV cache + prefill activations only.
        recompute: full activation recomputation (keep each block's input, redo its forward in backward; the
            activation checkpointing of distributed.fsdp).
        fsdp: FSDP2 + expert parallelism (fp32 shards of weights, gradients and AdamW states).
        fit: plan the fewest GPUs (ep x 1, 2, 4, ...) at which the run fits, instead of --gpus.
        json: print one JSON object.
    """
    bandwidth = parse_bytes(link_bandwidth, "--link-bandwidth")
    for name, value, given in (("--flops", flops, flops), ("--link-bandwidth", bandwidth, link_bandwidth),
                               ("--gpus", gpus, gpus), ("--ep", ep, ep), ("--micro-batch", micro_batch, micro_batch),
                               ("--seq-len", seq_len, seq_len)):
        if value is not None and (not math.isfinite(value) or value <= 0):
            raise UserError(f"{name} {given} must be a positive number")
    cfg = model_config(preset, config)
    kwargs = dict(gpu_memory=parse_bytes(gpu_memory, "--gpu-memory"), ep=ep, micro_batch=micro_batch,
                  seq_len=seq_len, dtype=dtype, flops=flops, link_bandwidth=bandwidth, global_batch=global_batch,
                  inference=inference, recompute=recompute, fsdp=fsdp)
    found = fewest_gpus(cfg, **kwargs) if fit else plan(cfg, gpus=gpus, **kwargs)  # type: ignore[arg-type]
    if found is None:
        raise UserError(f"--fit: {preset or config} does not fit on up to 16384 GPUs of {gpu_memory} with ep={ep}")
    p = found
    name = preset or config
    if json:
        print(jsonlib.dumps({"name": name, **asdict(p), "total_memory": p.total_memory, "fits": p.fits,
                             "step_s": p.step_s}))
        return 0
    print_rows(_rows(p, str(name)))
    return 0
