"""Whole models against transformers: our `Transformer` and transformers' `DeepseekV2ForCausalLM` with the same
shapes, side by side in one process: training step, prefill and decode tokens/s, training peak memory.

    python benchmarks/vs_transformers.py [--presets tiny-deepseekmoe,small-deepseekmoe,16b-2l] [--what train,decode]

Ours runs as the commands run it (`runtime.for_device`: the CPU runtime where there are 2+ threads, the calling
thread at one intra-op thread); transformers' calls run at the process's own intra-op thread count, as transformers
runs by default. Its model is built from the closest `DeepseekV2Config` (`hf_config`): the same vocabulary, widths, layer count, dense
first layers, routed and shared experts, greedy softmax top-k without renormalisation, routed_scaling_factor 1,
sdpa attention; what differs is its attention, which is always MLA there: q_proj without a low rank, keys and values
from one latent of `kv_lora_rank` (chosen so the attention has the same parameter count as ours), rotary on half of
each query/key head (qk_rope_head_dim = head_dim / 2, shared by the heads on the key side), and its cache holds the
latents, which every decode step expands through kv_b_proj for all cached positions. Its experts implementation is
the fastest of eager / grouped_mm / batched_mm on a first timed call of each (reported as `hf_experts`).

* train: forward, loss, backward, gradient clipping at 1.0, AdamW, on random ids (batch x seq). Ours: the loss
  `deepseekmoe train` uses (LM + balance losses); transformers': the LM cross-entropy. Peak memory: every
  allocation of one step replayed in time order (moe_layer.peak_memory: one intra-op thread, the experts in the
  calling thread), after the optimizer's state exists.
* prefill: one forward of the prompt (batch x prompt-len) filling a KV cache, inference mode.
* decode: greedy generation of N new tokens, ours through `generate_tokens`, transformers' through `generate` (its
  default dynamic cache); decode tokens/s = batch x (N - 1) / (time(N) - time(1)), so the prefill and the first
  token are left out on both sides.

Both models of a preset live in one process and their calls alternate round by round; ratios (ours / transformers
throughput) are medians of same-round ratios. The 16B-shaped preset (`16b-2l`: deepseekmoe-16b's layers, the dense
first one and one MoE layer, vocabulary 8192) trains one model at a time, since the two with their AdamW states
would not fit this machine's memory: its training rounds are not interleaved.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moe_layer import add_compete_option, competing_process, machine, peak_memory  # noqa: E402

from deepseekmoe import ModelConfig, Transformer, load_preset  # noqa: E402
from deepseekmoe.inference.generate import generate_tokens  # noqa: E402
from deepseekmoe.losses import total_loss  # noqa: E402
from deepseekmoe.runtime import for_device  # noqa: E402
from deepseekmoe.runtime.cpu import intra_op_threads  # noqa: E402

HF_EXPERTS = ("grouped_mm", "batched_mm", "eager")


def preset_config(name: str) -> ModelConfig:
    """A preset, or `16b-2l`: deepseekmoe-16b with its first (dense) layer and one MoE layer, vocabulary 8192."""
    if name == "16b-2l":
        cfg = load_preset("deepseekmoe-16b")
        cfg.num_hidden_layers, cfg.vocab_size = 2, 8192
        return cfg
    return load_preset(name)


def hf_config(cfg: ModelConfig):
    """transformers' DeepseekV2Config closest to ours (module docstring: only the attention differs)."""
    from transformers import DeepseekV2Config

    d, hd = cfg.hidden_size, cfg.head_dim
    rope = hd // 2
    # ours: k_proj + v_proj = 2 D^2; MLA: kv_a D x (r + rope) + kv_b r x H (hd - rope + hd), with H hd = D
    rank = 8 * round((2 * d * d - d * rope) / (d + cfg.num_attention_heads * (2 * hd - rope)) / 8)
    return DeepseekV2Config(
        vocab_size=cfg.vocab_size, hidden_size=d, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        first_k_dense_replace=cfg.first_k_dense_replace, q_lora_rank=None, kv_lora_rank=rank,
        qk_nope_head_dim=hd - rope, qk_rope_head_dim=rope, v_head_dim=hd,
        n_routed_experts=cfg.n_routed_experts, n_shared_experts=cfg.n_shared_experts,
        num_experts_per_tok=cfg.num_experts_per_tok, moe_intermediate_size=cfg.moe_intermediate_size,
        topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0, tie_word_embeddings=False,
        initializer_range=cfg.initializer_range, bos_token_id=None, eos_token_id=None, pad_token_id=0)


def build(cfg: ModelConfig, side: str) -> tuple[torch.nn.Module, object]:
    """(model, its CPU runtime or None)."""
    torch.manual_seed(0)
    if side == "ours":
        model = Transformer(cfg)
        return model, for_device(model, "cpu")
    from transformers import DeepseekV2ForCausalLM

    return DeepseekV2ForCausalLM._from_config(hf_config(cfg), attn_implementation="sdpa"), None


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_step(model: torch.nn.Module, side: str, ids: torch.Tensor, runtime=None) -> Callable[[], float]:
    """One full training step (module docstring); `step.reset()` drops the gradients, as the step itself does."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    if runtime is not None:
        runtime.attach_optimizer(opt)  # as train does
    model.train()

    def step() -> float:
        out = model(ids[:, :-1])
        if side == "ours":
            loss = total_loss(out.logits, ids[:, 1:], out.router_outputs, model.config).total
        else:
            loss = F.cross_entropy(out.logits.flatten(0, 1).float(), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()
    step.reset = lambda: opt.zero_grad(set_to_none=True)  # type: ignore[attr-defined]
    return step


def prefill_call(model: torch.nn.Module, side: str, prompt: torch.Tensor) -> Callable[[], None]:
    model.eval()

    @torch.inference_mode()
    def call() -> None:
        if side == "ours":
            model(prompt, 0, model.new_kv_caches(prompt.shape[0], prompt.shape[1]))
        else:
            model(prompt, use_cache=True)
    return call


def generate_call(model: torch.nn.Module, side: str, prompt: torch.Tensor, new_tokens: int) -> Callable[[], None]:
    """Greedy generation of `new_tokens` tokens after `prompt` (ours as `deepseekmoe generate` decodes)."""
    model.eval()

    @torch.inference_mode()
    def call() -> None:
        if side == "ours":
            torch.stack(list(generate_tokens(model, prompt, new_tokens, temperature=0.0)))
        else:
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False)
    return call


def at_default_threads(fn: Callable[[], object]) -> Callable[[], object]:
    """fn with the process's own intra-op thread count (as transformers runs), whatever our runtime set; our
    runtime's count is put back after."""
    def call() -> object:
        ours = torch.get_num_threads()
        torch.set_num_threads(intra_op_threads())
        try:
            return fn()
        finally:
            torch.set_num_threads(ours)
    call.reset = getattr(fn, "reset", None)  # type: ignore[attr-defined]
    return call


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


BATCHED_MM_MAX_BYTES = 2 << 30
"""batched_mm copies one expert's weights per (token, slot) row: left out above this many bytes of copies."""


def pick_hf_experts(hf: torch.nn.Module, make: Callable[[], Callable[[], object]], tokens: int) -> str:
    """The fastest transformers experts implementation for a call over `tokens` tokens: one warm-up and one timed
    call each (one that cannot run these operands, grouped_mm where a row stride is not a multiple of 16 bytes,
    is left out, and so is batched_mm above BATCHED_MM_MAX_BYTES of weight copies)."""
    c = hf.config
    copies = tokens * c.num_experts_per_tok * 3 * c.hidden_size * c.moe_intermediate_size * 4
    times = {}
    for impl in HF_EXPERTS:
        if impl == "batched_mm" and copies > BATCHED_MM_MAX_BYTES:
            continue
        hf.set_experts_implementation(impl)
        fn = make()
        try:
            fn()
        except RuntimeError:
            continue
        times[impl] = timed(fn)
    best = min(times, key=times.get)
    hf.set_experts_implementation(best)
    return best


def interleaved(calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call, the contenders alternating (the order flips every round); one warm-up call each."""
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {n: [] for n in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timed(calls[name]))
    return times


def ratio(ours: list[float], hf: list[float]) -> float:
    """Median over rounds of transformers' time / ours (= our throughput / theirs)."""
    return statistics.median(h / o for o, h in zip(ours, hf))


def measure_train(cfg: ModelConfig, batch: int, seq: int, rounds: int, interleave: bool,
                  memory: bool) -> dict[str, object]:
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(1))
    sides = ("ours", "hf")
    times: dict[str, list[float]] = {}
    row: dict[str, object] = {"what": "train", "batch": batch, "tokens": batch * seq}
    live = {}
    for side in sides:
        model, runtime = build(cfg, side)
        step = train_step(model, side, ids, runtime)
        if side == "hf":
            step = at_default_threads(step)
            row["hf_experts"] = pick_hf_experts(model, lambda: step, batch * seq)
        row[f"{side}_params"] = n_params(model)
        live[side] = (model, runtime, step)
        if not interleave:
            times.update(interleaved({side: step}, rounds))
            row[f"{side}_peak_mb"] = peak_memory(step, "cpu", runtime) / 2**20 if memory else None
            del model, runtime, step, live[side]
    if interleave:
        times = interleaved({side: live[side][2] for side in sides}, rounds)
        for side, (_, runtime, step) in live.items():
            row[f"{side}_peak_mb"] = peak_memory(step, "cpu", runtime) / 2**20 if memory else None
    return _throughput(row, times["ours"], times["hf"], batch * seq)


def measure_infer(cfg: ModelConfig, batches: list[int], prompt_len: int, new_tokens: int,
                  rounds: int) -> list[dict[str, object]]:
    models = {side: build(cfg, side)[0] for side in ("ours", "hf")}
    rows = []
    for batch in batches:
        prompt = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(2))
        calls = {side: prefill_call(m, side, prompt) for side, m in models.items()}
        calls["hf"] = at_default_threads(calls["hf"])
        impl = pick_hf_experts(models["hf"], lambda: calls["hf"], batch * prompt_len)
        t = interleaved(calls, rounds)
        rows.append(_throughput({"what": "prefill", "batch": batch, "tokens": batch * prompt_len,
                                 "hf_experts": impl}, t["ours"], t["hf"], batch * prompt_len))
        impl = pick_hf_experts(models["hf"], lambda: at_default_threads(generate_call(models["hf"], "hf", prompt, 8)),
                               batch * prompt_len)
        calls = {f"{side}:{n}": generate_call(m, side, prompt, n) for side, m in models.items()
                 for n in (1, new_tokens)}
        calls.update({k: at_default_threads(c) for k, c in calls.items() if k.startswith("hf")})
        t = interleaved(calls, rounds)
        decode = {side: [a - b for a, b in zip(t[f"{side}:{new_tokens}"], t[f"{side}:1"])] for side in models}
        rows.append(_throughput({"what": "decode", "batch": batch, "tokens": batch * (new_tokens - 1),
                                 "hf_experts": impl}, decode["ours"], decode["hf"], batch * (new_tokens - 1)))
    return rows


def _throughput(row: dict[str, object], ours: list[float], hf: list[float], tokens: int) -> dict[str, object]:
    row.update(ours_tokens_per_s=tokens / statistics.median(ours), hf_tokens_per_s=tokens / statistics.median(hf),
               ratio=ratio(ours, hf), rounds=len(ours))
    return row


PRESETS = "tiny-deepseekmoe,small-deepseekmoe,16b-2l"


def run(*, presets: str = PRESETS, what: str = "train,infer", batch: int = 8, seq: int = 256,
        big_batch: int = 4, big_seq: int = 512, prompt_len: int = 32, new_tokens: int = 32,
        decode_batches: str = "1,8", rounds: int = 5, big_rounds: int = 2, memory: bool = True,
        as_json: bool = False) -> int:
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if as_json else (lambda m: print(m, flush=True))
    info = machine()
    log(" ".join(f"{k}={v}" for k, v in info.items()))
    rows = []
    for preset in [p.strip() for p in presets.split(",") if p.strip()]:
        cfg, big = preset_config(preset), preset == "16b-2l"
        n = big_rounds if big else rounds
        found = []
        if "train" in what:
            found.append(measure_train(cfg, big_batch if big else batch, big_seq if big else seq, n, not big,
                                       memory))
        if "infer" in what:
            found += measure_infer(cfg, [int(b) for b in decode_batches.split(",")], prompt_len, new_tokens, n)
        for r in found:
            r["preset"] = preset
            log(_line(r))
        rows += found
    info["loadavg_end"] = machine()["loadavg"]
    if as_json:
        print(json.dumps({"machine": info, "results": rows}, indent=1))
    return 0


def _line(r: dict[str, object]) -> str:
    mem = ""
    if r.get("ours_peak_mb") is not None:
        mem = f"  peak MB ours {r['ours_peak_mb']:.0f} / hf {r['hf_peak_mb']:.0f}"
    return (f"{r['preset']:<18} {r['what']:<8} b={r['batch']:<2} ours {r['ours_tokens_per_s']:9.1f} tok/s  "
            f"hf({r['hf_experts']}) {r['hf_tokens_per_s']:9.1f} tok/s  ours/hf {r['ratio']:.2f}{mem}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default=PRESETS, help="comma-separated presets, and/or 16b-2l")
    p.add_argument("--what", default="train,infer", help="train and/or infer (prefill + decode)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--big-batch", type=int, default=4, help="16b-2l training batch")
    p.add_argument("--big-seq", type=int, default=512, help="16b-2l training sequence length")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--decode-batches", default="1,8")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--big-rounds", type=int, default=2, help="rounds for 16b-2l")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--json", dest="as_json", action="store_true")
    add_compete_option(p)
    args = vars(p.parse_args(argv))
    with competing_process(args.pop("compete")):
        return run(**args)


if __name__ == "__main__":
    sys.exit(main())
