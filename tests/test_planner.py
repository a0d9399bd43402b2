"""`deepseekmoe plan`: memory terms checked by hand on the tiny config, the paper's hardware facts, clear errors."""

from __future__ import annotations

import json

import pytest

from conftest import tiny_config
from deepseekmoe.accounting import count
from deepseekmoe.cli import main
from deepseekmoe.distributed.planner import fewest_gpus, fsdp_shard_params, plan
from deepseekmoe.units import parse_bytes
from deepseekmoe.presets import load_preset


def test_tiny_config_terms_by_hand():
    c = tiny_config()  # V=97, D=32, 2 MoE layers, 4 heads (MHA), E=8 routed of F=16, K=2, 1 shared
    assert count(c).total_params == 42720  # 2*97*32 + 5*32 norms + 2 * (4*32*32 + 8*32 + 9*3*32*16)
    p = plan(c, gpus=4, ep=2, gpu_memory=1e9, micro_batch=2, seq_len=16, flops=1e12, link_bandwidth=1e9)
    assert (p.dp, p.ep) == (2, 2)
    assert p.params_per_gpu == 42720 - 24576 + 12288  # routed experts 2*8*3*32*16 = 24576, halved
    assert p.memory["weights"] == 30432 * 2 and p.memory["gradients"] == 30432 * 2
    assert p.memory["optimizer"] == 30432 * 12
    # per token (bytes): per layer attention (4*32 + 2*32)*2 = 384; MoE (2*32 + 2*(2*32 + 3*16) + 2*2*32 + 3*16)*2
    # + router 2*8*4 = 992; head (2*32 + 97)*2 + 2*97*4 = 1098  ->  2*(384 + 992) + 1098 = 3850
    assert p.memory["activations"] == 2 * 16 * 3850
    assert p.all_to_all_bytes == 2 * 4 * 32 * 2 * 32 * 2 / 2  # layers x 4 x tokens x K x D x b x (ep-1)/ep
    dense, experts = 18144 * 2, 12288 * 2
    assert p.all_reduce_bytes == pytest.approx(2 * 3 / 4 * dense + 2 * 1 / 2 * experts)
    assert p.compute_s == pytest.approx(count(c, 16).flops_per_token * 32 / 1e12)
    assert p.step_s == pytest.approx(p.compute_s + (p.all_to_all_bytes + p.all_reduce_bytes) / 1e9)


def test_recompute_keeps_layer_inputs_and_one_layer():
    c = tiny_config()
    p = plan(c, gpus=4, ep=2, gpu_memory=1e9, micro_batch=2, seq_len=16, flops=1e12, recompute=True)
    # 2 layer inputs x 32 x 2 bytes + one MoE layer (384 + 992) + head 1098, per token (see the test above)
    assert p.memory["activations"] == 2 * 16 * (2 * 32 * 2 + 384 + 992 + 1098)
    assert p.compute_s == pytest.approx(count(c, 16).flops_per_token * 32 / 1e12 * 4 / 3)


def test_uneven_expert_split_counts_the_fullest_gpu():
    c = tiny_config()  # 8 routed experts over 3 GPUs: blocks of 3, 3, 2
    p = plan(c, gpus=3, ep=3, gpu_memory=1e9, seq_len=8)
    assert p.params_per_gpu == 42720 - 24576 + 3 * 2 * 3 * 32 * 16  # 3 experts x 2 layers x 3 D F


def test_fp32_has_no_master_copy_and_accumulation_scales_traffic():
    c = tiny_config()
    one = plan(c, gpus=2, ep=2, gpu_memory=1e9, seq_len=8, dtype="fp32")
    assert one.memory["weights"] == one.params_per_gpu * 4 and one.memory["optimizer"] == one.params_per_gpu * 8
    four = plan(c, gpus=2, ep=2, gpu_memory=1e9, seq_len=8, dtype="fp32", global_batch=8)
    assert four.grad_accum == 4 and four.tokens_per_step == 8 * 8
    assert four.all_to_all_bytes == 4 * one.all_to_all_bytes and four.all_reduce_bytes == one.all_reduce_bytes


def test_16b_bf16_inference_fits_one_40gb_gpu():
    p = plan(load_preset("deepseekmoe-16b"), gpus=1, gpu_memory=parse_bytes("40GB"), inference=True)
    assert 32.7e9 < p.memory["weights"] < 32.8e9  # 16.38B parameters x 2 bytes
    assert p.fits and p.total_memory < 40e9
    assert "optimizer" not in p.memory


def test_16b_training_needs_expert_parallelism():
    c = load_preset("deepseekmoe-16b")
    assert not plan(c, gpus=1, gpu_memory=80e9).fits  # 16.4B x 16 bytes of weights/grads/AdamW alone
    assert plan(c, gpus=8, ep=8, gpu_memory=80e9).fits


@pytest.mark.parametrize("kwargs, message", [
    (dict(gpus=8, ep=3), "ep=3 does not divide the number of processes (GPUs) 8"),
    (dict(gpus=128, ep=128), "ep=128 exceeds n_routed_experts=64"),
    (dict(gpus=2, ep=4), "ep=4 exceeds gpus=2"),
    (dict(gpus=1, dtype="int3"), "dtype='int3' is invalid"),
    (dict(gpus=1, seq_len=5000), "seq_len=5000 is invalid"),
    (dict(gpus=4, global_batch=6), "global_batch=6 is not a multiple"),
])
def test_impossible_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan(load_preset("deepseekmoe-16b"), gpu_memory=80e9, **kwargs)


def test_parse_bytes():
    assert parse_bytes("80GB") == 80e9 and parse_bytes("40GiB") == 40 * 2**30 and parse_bytes("400GB/s") == 400e9
    with pytest.raises(ValueError, match="80XB"):
        parse_bytes("80XB")


@pytest.mark.parametrize("option, value", [("--flops", "0"), ("--flops", "nan"), ("--flops", "-5"),
                                           ("--link-bandwidth", "0GB/s"), ("--seq-len", "0")])
def test_non_positive_rates_and_sizes_are_one_line(capsys, option, value):
    assert main(["plan", "--preset", "deepseekmoe-16b", option, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"deepseekmoe: error: {option} ") and "must be a positive" in err[0]


def test_cli_json_and_errors(capsys):
    assert main(["plan", "--preset", "deepseekmoe-16b", "--gpu-memory", "40GB", "--inference", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["params_per_gpu"] == count(load_preset("deepseekmoe-16b")).total_params
    assert main(["plan", "--preset", "deepseekmoe-16b", "--gpus", "8", "--ep", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["deepseekmoe: error: ep=3 does not divide the number of processes (GPUs) 8"]


def test_fsdp_terms_by_hand():
    c = tiny_config()
    p = plan(c, gpus=4, ep=2, gpu_memory=1e9, micro_batch=2, seq_len=16, flops=1e12, link_bandwidth=1e9, fsdp=True)
    # rows cut over 4 GPUs (ceil): root embed 25x32 + head 25x32 + norm 8 = 1608; per block norms 2x8, q/k/v/o
    # 4 x 8x32, router 2x32, shared gate/up 2 x 4x32 + down 8x16 = 1488, plus ceil(ceil(8/2)/2) = 2 experts of
    # 3x32x16 = 3072  ->  1608 + 2 x (1488 + 3072)
    assert fsdp_shard_params(c, 4, 2) == (10728, 5952 + 4 * 1536)  # largest unit: a block + its 4 experts
    assert p.params_per_gpu == 10728
    assert p.memory == {"weights": 10728 * 4, "gradients": 10728 * 4, "optimizer": 10728 * 8,
                        "unit_buffers": 12096 * (3 * 2 + 4), "activations": 2 * 16 * 3850}
    # dense 18144 params over 4 GPUs, the 12288-parameter expert block over dp=2: (n-1)/n x P x (2 x 2 + 4)
    assert p.shard_bytes == pytest.approx(3 / 4 * 18144 * 8 + 1 / 2 * 12288 * 8) and p.all_reduce_bytes == 0
    assert p.step_s == pytest.approx(p.compute_s + (p.all_to_all_bytes + p.shard_bytes) / 1e9)
    four = plan(c, gpus=4, ep=2, gpu_memory=1e9, micro_batch=2, seq_len=16, fsdp=True, global_batch=16)
    assert four.shard_bytes == pytest.approx(2 * p.shard_bytes)  # gathered and reduced per micro-batch


def test_recompute_repeats_the_forward_all_to_alls():
    c = tiny_config()
    base = plan(c, gpus=4, ep=2, gpu_memory=1e9, micro_batch=2, seq_len=16)
    assert plan(c, gpus=4, ep=2, gpu_memory=1e9, micro_batch=2, seq_len=16,
                recompute=True).all_to_all_bytes == 1.5 * base.all_to_all_bytes


def test_16b_fsdp_on_8_gpus_and_145b_with_the_papers_ep4():
    c16 = load_preset("deepseekmoe-16b")
    ddp, fsdp = (plan(c16, gpus=8, ep=8, gpu_memory=80e9, fsdp=f) for f in (False, True))
    assert ddp.fits and fsdp.fits and fsdp.total_memory < ddp.total_memory - 15e9
    c = load_preset("deepseekmoe-145b")  # the paper: routed experts of each layer over 4 devices, with DP
    assert fewest_gpus(c, ep=4, gpu_memory=80e9) is None  # replicated dense part: 10B x 16 bytes
    assert fewest_gpus(c, ep=4, gpu_memory=80e9, fsdp=True) is None  # 62 layers of activations at 4096 tokens
    p = fewest_gpus(c, ep=4, gpu_memory=80e9, fsdp=True, recompute=True)
    assert p is not None and (p.gpus, p.dp) == (64, 16) and p.total_memory < 80e9
    assert not plan(c, gpus=32, ep=4, gpu_memory=80e9, fsdp=True, recompute=True).fits


def test_cli_fit(capsys):
    assert main(["plan", "--preset", "deepseekmoe-145b", "--ep", "4", "--fsdp", "--recompute", "--fit",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["gpus"] == 64
    assert main(["plan", "--preset", "deepseekmoe-145b", "--ep", "4", "--fit"]) == 2
    assert capsys.readouterr().err.strip() == (
        "deepseekmoe: error: --fit: deepseekmoe-145b does not fit on up to 16384 GPUs of 80GB with ep=4")
