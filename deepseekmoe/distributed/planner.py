"""Size a run on paper: per-GPU memory, all-to-all and gradient traffic, step time (`deepseekmoe plan`).

The layout is what `deepseekmoe.distributed` runs: G GPUs = dp x ep; every GPU reads its own micro-batch; the
dense part (embeddings, attention, dense FFNs, shared experts, routers, norms, LM head) is replicated on every GPU
(DDP); the routed experts of each MoE layer are split over the ep GPUs of a group (ceil(E/ep) on the fullest).

Memory per GPU, training (mixed precision with `--dtype bf16`/`fp16`; AdamW):
    weights      P_gpu x b                  P_gpu = P_dense + P_routed x ceil(E/ep) / E, b = bytes of --dtype
    gradients    P_gpu x b                  (gradients in the weight dtype, as DDP all-reduces them)
    optimizer    P_gpu x 12                 fp32 master copy + exp_avg + exp_avg_sq (4 + 4 + 4 bytes);
                 P_gpu x 8 with fp32        (no master copy needed)
    activations  micro_batch x seq_len x (sum over layers of A_layer + A_head), no activation recomputation,
                 fused (flash) attention so no S x S scores are kept. Per token, in elements of b bytes:
        attention    4D + 2D_kv              norm in/out, q, attention output; k, v
        dense FFN    2D + 3I                 norm in/out; gate, up, silu(gate) * up
        MoE          2D + K(2D + 3F) + 3 K_s F  norm in/out; per routed row: gathered input, gate, up, product,
                     (+ 2KD with ep > 1)       expert output; shared experts; (send and receive buffers)
                     + router logits and probabilities: 2E fp32
        head         2D + V (b) + 2V (fp32)  final norm; logits, their fp32 copy and log-softmax
With `--recompute` (full activation checkpointing) only each layer's input is kept (D x b per token and layer),
plus one layer's activations and the head's during its backward; compute grows by one forward (x 4/3).
Memory per GPU, inference (`--inference`): weights + KV cache (2 x layers x micro_batch x seq_len x D_kv x b) +
    one layer's activations and the fp32 logits for a full prefill of micro_batch x seq_len tokens.
Traffic per GPU per optimizer step (bytes sent; balanced routing, so (ep-1)/ep of the rows leave the GPU):
    all-to-all   MoE layers x 4 (dispatch + combine, forward + backward) x tokens x K x D x b x (ep-1)/ep;
                 x 6 with --recompute (the forward's two exchanges run again in backward)
    all-reduce   ring: 2 (n-1)/n x gradient bytes, dense gradients over all G GPUs, expert ones over dp
With `--fsdp` (the layout of `distributed.fsdp.apply_fsdp`: FSDP2 units = the root (embeddings, final norm, head),
each block's dense part over all G GPUs, each MoE layer's expert block over its dp GPUs):
    weights, gradients  P_shard x 4 each         fp32 shards (the master weights; gradients reduced in fp32)
    optimizer    P_shard x 8                     exp_avg + exp_avg_sq
                 P_shard = sum over dense tensors of ceil(rows / G) x row size
                           + per MoE layer ceil(ceil(E/ep) / dp) experts x 3 D F   (the fullest GPU)
    unit buffers U x (3b + 4)                    the largest unit U (root, or one block's dense part + its
                                                 ceil(E/ep) experts) all-gathered in b (current + prefetched),
                                                 its unsharded gradient (b) and the fp32 reduce-scatter input
    activations  as above
    traffic      per micro-batch (no gradient accumulation without reduce-scatter): parameters all-gathered in
                 forward and again in backward, gradients reduce-scattered in fp32:
                 (n-1)/n x P x (2b + 4) for the dense part (n = G) and the expert block (n = dp)
Step time = compute + all-to-all + all-reduce (or FSDP traffic), no overlap (an upper bound): compute = training
FLOPs per token (deepseekmoe.accounting.count) x tokens per GPU / --flops; communication = bytes / --link-bandwidth.
`--fit` doubles the GPU count from ep until the run fits (`fewest_gpus`).
Sizes: "GB" is 10^9 bytes, "GiB" 2^30 (an "A100 40GB" has 40 GiB, so 40GB is the conservative reading).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..accounting import count
from ..config import ModelConfig
from ..errors import UserValueError
from .mesh import check_sizes

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def routed_expert_params(c: ModelConfig) -> int:
    if not c.is_moe:
        return 0
    assert c.n_routed_experts is not None
    return c.num_moe_layers * c.n_routed_experts * 3 * c.hidden_size * c.moe_intermediate_size


def activation_bytes_per_token(c: ModelConfig, b: int, ep: int) -> int:
    """Activations kept for backward per token of one micro-batch (formula in the module docstring)."""
    d, kv = c.hidden_size, c.num_kv_heads * c.head_dim
    total = 0
    for i in range(c.num_hidden_layers):
        total += (4 * d + 2 * kv) * b
        if c.is_moe_layer(i):
            k, f = c.num_experts_per_tok, c.moe_intermediate_size
            rows = k * (2 * d + 3 * f) + (2 * k * d if ep > 1 else 0)
            total += (2 * d + rows + 3 * c.n_shared_experts * f) * b + 2 * c.n_routed_experts * 4  # type: ignore
        else:
            total += (2 * d + 3 * c.intermediate_size) * b
    return total + (2 * d + c.vocab_size) * b + 2 * c.vocab_size * 4


def _one_layer_bytes_per_token(c: ModelConfig, b: int, ep: int) -> int:
    """The widest single layer's activations plus the head's (logits), per token."""
    per_layer = activation_bytes_per_token(c.replace(num_hidden_layers=1, first_k_dense_replace=0), b, ep)
    if c.first_k_dense_replace or not c.is_moe:
        per_layer = max(per_layer, activation_bytes_per_token(
            c.replace(num_hidden_layers=1, first_k_dense_replace=1), b, ep))
    return per_layer


@dataclass
class Plan:
    gpus: int
    ep: int
    dp: int
    dtype: str
    inference: bool
    recompute: bool
    fsdp: bool
    micro_batch: int
    seq_len: int
    grad_accum: int
    params_per_gpu: int
    memory: dict[str, float] = field(default_factory=dict)
    """term -> bytes per GPU."""
    gpu_memory: float = 0.0
    tokens_per_step: int = 0
    all_to_all_bytes: float = 0.0
    all_reduce_bytes: float = 0.0
    compute_s: float = 0.0
    all_to_all_s: float = 0.0
    all_reduce_s: float = 0.0
    shard_bytes: float = 0.0
    """FSDP all-gather + reduce-scatter bytes per GPU per step."""
    shard_s: float = 0.0

    @property
    def total_memory(self) -> float:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return self.total_memory <= self.gpu_memory

    @property
    def step_s(self) -> float:
        return self.compute_s + self.all_to_all_s + self.all_reduce_s + self.shard_s


def plan(c: ModelConfig, *, gpus: int, gpu_memory: float, ep: int = 1, micro_batch: int = 1,
         seq_len: int | None = None, dtype: str = "bf16", flops: float = 989e12, link_bandwidth: float = 400e9,
         global_batch: int | None = None, inference: bool = False, recompute: bool = False,
         fsdp: bool = False) -> Plan:
    """Per-GPU memory, traffic and step time of a (gpus / ep) x ep run of model `c`."""
    s = seq_len or c.max_position_embeddings
    _check(c, gpus, ep, micro_batch, s, dtype, global_batch)
    b = DTYPE_BYTES[dtype]
    routed = routed_expert_params(c)
    total = count(c, s).total_params
    experts_gpu = routed // c.n_routed_experts * -(-c.n_routed_experts // ep) if routed else 0  # type: ignore
    p_gpu = total - routed + experts_gpu
    accum = global_batch // (micro_batch * gpus) if global_batch else 1
    p = Plan(gpus, ep, gpus // ep, dtype, inference, recompute, fsdp and not inference, micro_batch, s, accum,
             p_gpu,             gpu_memory=gpu_memory, tokens_per_step=micro_batch * s * gpus * accum)
    tokens = micro_batch * s
    if inference:
        p.memory = {"weights": p_gpu * b,
                    "kv_cache": 2 * c.num_hidden_layers * tokens * c.num_kv_heads * c.head_dim * b,
                    "activations": tokens * _one_layer_bytes_per_token(c, b, 1)}
        return p
    activations = tokens * (c.num_hidden_layers * c.hidden_size * b + _one_layer_bytes_per_token(c, b, ep)
                            if recompute else activation_bytes_per_token(c, b, ep))
    dense = total - routed
    if p.fsdp:
        shard, unit = fsdp_shard_params(c, gpus, ep)
        p.params_per_gpu = shard
        p.memory = {"weights": shard * 4, "gradients": shard * 4, "optimizer": shard * 8,
                    "unit_buffers": unit * (3 * b + 4), "activations": activations}
        p.shard_bytes = accum * (_gather_scatter(dense, gpus, b) + _gather_scatter(experts_gpu, gpus // ep, b))
    else:
        p.memory = {"weights": p_gpu * b, "gradients": p_gpu * b, "optimizer": p_gpu * (8 if b == 4 else 12),
                    "activations": activations}
        p.all_reduce_bytes = _ring(dense * b, gpus) + _ring(experts_gpu * b, gpus // ep)
    k = c.num_experts_per_tok if c.is_moe else 0
    exchanges = 6 if recompute else 4
    p.all_to_all_bytes = c.num_moe_layers * exchanges * tokens * accum * k * c.hidden_size * b * (ep - 1) / ep
    p.shard_s = p.shard_bytes / link_bandwidth
    p.compute_s = count(c, s).flops_per_token * (4 / 3 if recompute else 1) * tokens * accum / flops
    p.all_to_all_s = p.all_to_all_bytes / link_bandwidth
    p.all_reduce_s = p.all_reduce_bytes / link_bandwidth
    return p


def _ring(nbytes: float, n: int) -> float:
    return 2 * (n - 1) / n * nbytes


def _gather_scatter(params: int, n: int, b: int) -> float:
    """All-gather in forward and in backward (b bytes), reduce-scatter of the fp32 gradients, over n ranks."""
    return (n - 1) / n * params * (2 * b + 4)


def _block_shapes(c: ModelConfig, i: int) -> list[tuple[int, ...]]:
    """Shapes of block i's dense parameters (routed experts excluded), as the model builds them."""
    d, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes = [(d,), (d,), (q, d), (kv, d), (kv, d), (d, q)]
    if not c.is_moe_layer(i):
        return shapes + [(c.intermediate_size, d)] * 2 + [(d, c.intermediate_size)]
    shared = c.n_shared_experts * c.moe_intermediate_size
    router = [] if c.router == "hash" else [(c.n_routed_experts, d)]
    return shapes + router + ([(shared, d)] * 2 + [(d, shared)] if shared else [])


def fsdp_shard_params(c: ModelConfig, gpus: int, ep: int) -> tuple[int, int]:
    """(parameters on the fullest GPU, parameters of the largest FSDP unit unsharded) under `apply_fsdp`: dense
    tensors cut by rows over all GPUs (ceil), each EP block of ceil(E/ep) experts cut by experts over dp (ceil)."""
    d, v = c.hidden_size, c.vocab_size
    root = [(v, d), (d,)] + ([] if c.tie_word_embeddings else [(v, d)])
    per_expert = 3 * d * c.moe_intermediate_size if c.is_moe else 0
    block = -(-c.n_routed_experts // ep) if c.is_moe else 0  # type: ignore[operator]

    def shard(shapes: list[tuple[int, ...]]) -> int:
        return sum(-(-s[0] // gpus) * math.prod(s[1:]) for s in shapes)

    total, largest = shard(root), sum(math.prod(s) for s in root)
    for i in range(c.num_hidden_layers):
        shapes, experts = _block_shapes(c, i), block if c.is_moe_layer(i) else 0
        total += shard(shapes) + -(-experts // (gpus // ep)) * per_expert
        largest = max(largest, sum(math.prod(s) for s in shapes) + experts * per_expert)
    return total, largest


def fewest_gpus(c: ModelConfig, *, ep: int, limit: int = 16384, **kwargs) -> Plan | None:
    """The plan at the fewest GPUs (ep x 1, 2, 4, ...) up to `limit` at which the run fits; None if none does."""
    gpus = ep
    while gpus <= limit:
        batch = kwargs.get("global_batch")
        if not batch or batch % (kwargs.get("micro_batch", 1) * gpus) == 0:
            p = plan(c, gpus=gpus, ep=ep, **kwargs)
            if p.fits:
                return p
        gpus *= 2
    return None


def _check(c: ModelConfig, gpus: int, ep: int, micro_batch: int, s: int, dtype: str,
           global_batch: int | None) -> None:
    if gpus < 1:
        raise UserValueError(f"gpus={gpus} is invalid: expected an integer >= 1")
    if ep > gpus:
        raise UserValueError(f"ep={ep} exceeds gpus={gpus}")
    check_sizes(gpus, ep, c.n_routed_experts if c.is_moe else None)
    if micro_batch < 1:
        raise UserValueError(f"micro_batch={micro_batch} is invalid: expected an integer >= 1")
    if not 1 <= s <= c.max_position_embeddings:
        raise UserValueError(f"seq_len={s} is invalid: expected 1..max_position_embeddings={c.max_position_embeddings}")
    if dtype not in DTYPE_BYTES:
        raise UserValueError(f"dtype={dtype!r} is invalid: expected one of {', '.join(DTYPE_BYTES)}")
    if global_batch is not None and (global_batch < 1 or global_batch % (micro_batch * gpus)):
        raise UserValueError(f"global_batch={global_batch} is not a multiple of micro_batch x gpus = "
                         f"{micro_batch * gpus}")
