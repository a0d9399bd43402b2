"""FSDP2 + expert parallelism and sharded checkpoints on 4 and 2 CPU processes (gloo) against one process.

One spawn per world size (module fixtures; process start-up dominates): the 4 ranks train at several (dp, ep)
layouts and write sharded checkpoints; the 2 ranks resume those at other layouts. Each test compares what the ranks
recorded with a single-process run done here. Tolerance: fp32 reduction order (reduce-scatter and all-reduce sum
in a different order than one process's backward), observed ~1e-7 relative on the losses; asserted at 1e-5.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import tiny_config
from deepseekmoe import Transformer
from deepseekmoe.accounting import count
from deepseekmoe.checkpoint import MODEL_FILE, read_safetensors, save_model
from deepseekmoe.distributed import Parallel, init_parallel, local_batch
from deepseekmoe.distributed.fsdp import apply_fsdp, clip_grad_norm_, gather_full_state, mixed_precision
from deepseekmoe.distributed.planner import fsdp_shard_params
from deepseekmoe.losses import total_loss
from deepseekmoe.train.optim import param_groups
from deepseekmoe.train.sharded_checkpoint import (load_sharded, read_sharded, save_sharded, sharded_to_single,
                                                  single_to_sharded)
from deepseekmoe.train.state import TRAINER_STATE_FILE

pytestmark = pytest.mark.slow  # two spawns (4 and 2 processes): ~1-2 min on 2 busy cores

STEPS, CUT, BATCH, SEQ = 5, 3, 4, 8
TOL = dict(rtol=1e-5, atol=1e-5)
CONFIGS = {"even": tiny_config(device_aux_loss_alpha=0.05, n_device_groups=2, aux_loss_alpha=0.01),
           "uneven": tiny_config(n_routed_experts=7),  # ep=2: blocks of 4 and 3; FSDP over dp=2 cuts 3 as 2 + 1
           "few": tiny_config(n_routed_experts=3)}  # ep=1 on 4 ranks: 1, 1, 1 and 0 experts
ONE = Parallel(None, 1, 1, 0, torch.device("cpu"))


def data(config) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, config.vocab_size, (BATCH, SEQ + 1), generator=g) for _ in range(STEPS)]


def build(kind: str, parallel: Parallel, ac: bool = False) -> tuple[Transformer, torch.optim.AdamW]:
    torch.manual_seed(0)
    model = apply_fsdp(Transformer(CONFIGS[kind]).train(), parallel, activation_checkpointing=ac)
    return model, torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)


def steps(model, opt, parallel: Parallel, batches: list[torch.Tensor]) -> list[float]:
    """AdamW steps with global-norm clipping (small, so it is active); the rank-averaged loss of each."""
    losses = []
    for batch in batches:
        batch = local_batch(batch, parallel)
        out = model(batch[:, :-1])
        loss = total_loss(out.logits, batch[:, 1:], out.router_outputs, model.config).total
        loss.backward()
        clip_grad_norm_(model, 0.05, parallel)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.detach().clone()
        if parallel.is_distributed:
            dist.all_reduce(loss)
        losses.append(loss.item() / parallel.world_size)
    return losses


# ------------------------------------------------------------------ what the ranks do
def _train_and_save(kind: str, ep: int, tmp: Path) -> dict:
    """5 steps at (4 / ep, ep); sharded checkpoints after step 3 and step 5; the gathered final state."""
    parallel = init_parallel(ep=ep, n_routed_experts=CONFIGS[kind].n_routed_experts)
    model, opt = build(kind, parallel)
    batches = data(model.config)
    losses = steps(model, opt, parallel, batches[:CUT])
    save_sharded(tmp / f"{kind}_ep{ep}_cut", model, opt, parallel, extra={"progress": {"step": CUT}})
    losses += steps(model, opt, parallel, batches[CUT:])
    save_sharded(tmp / f"{kind}_ep{ep}_end", model, opt, parallel)
    state, moments = gather_full_state(model, opt)
    numel = [None] * parallel.world_size
    dist.all_gather_object(numel, sum(p.to_local().numel() for p in model.parameters()))
    return {"losses": losses, "state": state, "moments": moments, "numel": numel}


def _checkpointed(parallel_ep: int) -> list[float]:
    parallel = init_parallel(ep=parallel_ep, n_routed_experts=8)
    model, opt = build("even", parallel, ac=True)
    return steps(model, opt, parallel, data(model.config))


def _bf16(ep: int) -> dict:
    """The CUDA policy (bf16 compute, fp32 reduction and master weights), run on CPU."""
    parallel = init_parallel(ep=ep, n_routed_experts=8)
    torch.manual_seed(0)
    model = apply_fsdp(Transformer(CONFIGS["even"]).train(), parallel, policy=mixed_precision(torch.device("cuda")))
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-2)
    losses = steps(model, opt, parallel, data(model.config))
    return {"losses": losses, "dtypes": {p.dtype for p in model.parameters()}}


def _resume(kind: str, ep: int, source: Path) -> list[float]:
    parallel = init_parallel(ep=ep, n_routed_experts=CONFIGS[kind].n_routed_experts)
    model, opt = build(kind, parallel)
    with torch.no_grad():  # make sure the weights come from the checkpoint
        for p in model.parameters():
            p.zero_()
    extra = load_sharded(source, model, opt, parallel)
    assert extra.get("progress", {"step": CUT})["step"] == CUT
    return steps(model, opt, parallel, data(model.config)[CUT:])


def _four(rank: int, tmp: Path) -> dict:
    return {"even_ep2": _train_and_save("even", 2, tmp), "even_ep4": _train_and_save("even", 4, tmp),
            "uneven_ep2": _train_and_save("uneven", 2, tmp), "few_ep1": _train_and_save("few", 1, tmp),
            "ac_ep1": _checkpointed(1), "ac_ep2": _checkpointed(2)}


def _two(rank: int, tmp: Path) -> dict:
    return {"even_from_ep2_at_ep1": _resume("even", 1, tmp / "even_ep2_cut"),
            "even_from_ep4_at_ep2": _resume("even", 2, tmp / "even_ep4_cut"),
            "uneven_from_ep2_at_ep1": _resume("uneven", 1, tmp / "uneven_ep2_cut"),
            "even_from_one_at_ep2": _resume("even", 2, tmp / "one_sharded"), "bf16_ep2": _bf16(2)}


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    out = (_four if world == 4 else _two)(rank, Path(tmp))
    if rank == 0:
        torch.save(out, Path(tmp) / f"world{world}.pt")
    dist.destroy_process_group()


def _spawn(world: int, tmp: Path) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(world, port, str(tmp)), nprocs=world)
    return torch.load(tmp / f"world{world}.pt", weights_only=False)


# ------------------------------------------------------------------ fixtures: single process, then 4, then 2
@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """Uninterrupted single-process runs; the even one also saved (single-file) after step 3, and converted."""
    tmp = tmp_path_factory.mktemp("fsdp")
    out = {"tmp": tmp}
    for kind in CONFIGS:
        model, opt = build(kind, ONE)
        batches = data(model.config)
        losses = steps(model, opt, ONE, batches[:CUT])
        if kind == "even":
            save_sharded(tmp / "one_sharded", model, opt, ONE, extra={"progress": {"step": CUT}})
        out[kind] = losses + steps(model, opt, ONE, batches[CUT:])
    return out


@pytest.fixture(scope="module")
def four(reference) -> dict:
    return _spawn(4, reference["tmp"])


@pytest.fixture(scope="module")
def two(reference, four) -> dict:
    return _spawn(2, reference["tmp"])


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("run, kind", [("even_ep2", "even"), ("even_ep4", "even"), ("uneven_ep2", "uneven"),
                                       ("few_ep1", "few")])
def test_five_steps_fsdp_ep_match_one_process(reference, four, run, kind):
    expected = reference[kind]
    assert expected[0] != expected[-1]  # it trained
    torch.testing.assert_close(torch.tensor(four[run]["losses"]), torch.tensor(expected), **TOL)


@pytest.mark.parametrize("run, kind, ep", [("even_ep2", "even", 2), ("even_ep4", "even", 4),
                                           ("uneven_ep2", "uneven", 2), ("few_ep1", "few", 1)])
def test_planner_counts_the_fullest_ranks_shard(four, run, kind, ep):
    numel = four[run]["numel"]
    assert sum(numel) == count(CONFIGS[kind]).total_params  # every element on exactly one rank
    assert max(numel) == numel[0] == fsdp_shard_params(CONFIGS[kind], 4, ep)[0]


@pytest.mark.parametrize("run", ["ac_ep1", "ac_ep2"])
def test_activation_checkpointing_matches_one_process(reference, four, run):
    torch.testing.assert_close(torch.tensor(four[run]), torch.tensor(reference["even"]), **TOL)


def test_activation_checkpointing_on_one_process_is_bit_identical():
    model, opt = build("even", ONE)
    plain = steps(model, opt, ONE, data(model.config))
    model, opt = build("even", ONE, ac=True)
    assert steps(model, opt, ONE, data(model.config)) == plain


def test_bf16_policy_keeps_fp32_master_weights_and_tracks_fp32(reference, two):
    got = two["bf16_ep2"]
    assert got["dtypes"] == {torch.float32}  # the sharded parameters AdamW updates
    assert got["losses"] != reference["even"]  # bf16 compute rounds differently, but stays close
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(reference["even"]), rtol=1e-2, atol=0)


def test_mixed_precision_policies():
    gpu, cpu = mixed_precision(torch.device("cuda")), mixed_precision(torch.device("cpu"))
    assert (gpu.param_dtype, gpu.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert (cpu.param_dtype, cpu.reduce_dtype) == (None, None)


@pytest.mark.parametrize("run, source", [("even_from_ep2_at_ep1", "even"), ("even_from_ep4_at_ep2", "even"),
                                         ("uneven_from_ep2_at_ep1", "uneven"), ("even_from_one_at_ep2", "even")])
def test_resume_at_another_layout_repeats_the_uninterrupted_run(reference, two, run, source):
    torch.testing.assert_close(torch.tensor(two[run]), torch.tensor(reference[source][CUT:]), **TOL)


@pytest.mark.parametrize("run", ["even_ep2", "even_ep4", "uneven_ep2", "few_ep1"])
def test_converted_single_file_equals_the_gathered_state_exactly(reference, four, run, tmp_path):
    single = sharded_to_single(reference["tmp"] / f"{run}_end", tmp_path / "single")
    weights = read_safetensors(single / MODEL_FILE)
    gathered = four[run]["state"]
    assert set(weights) == set(gathered) - ({"lm_head.weight"} if "lm_head.weight" not in weights else set())
    for name, tensor in weights.items():
        assert torch.equal(tensor, gathered[name]), name
    trainer = torch.load(single / TRAINER_STATE_FILE, weights_only=True)
    model, _ = build(run.split("_")[0], ONE)
    name_of = {id(p): n for n, p in model.named_parameters()}
    positions = [name_of[id(q)] for g in param_groups(model, 0.1) for q in g["params"]]
    for i, name in enumerate(positions):
        for key, value in four[run]["moments"][name].items():
            assert torch.equal(trainer["optimizer"]["state"][i][key], value), (name, key)


def test_single_file_round_trip_and_one_process_load(reference, four, tmp_path):
    src = reference["tmp"] / "even_ep2_end"
    single = sharded_to_single(src, tmp_path / "single")
    again = sharded_to_single(single_to_sharded(single, tmp_path / "sharded"), tmp_path / "single2")
    for name, tensor in read_safetensors(single / MODEL_FILE).items():
        assert torch.equal(read_safetensors(again / MODEL_FILE)[name], tensor), name
    flat = read_sharded(src)
    assert set(read_sharded(tmp_path / "sharded")) == set(flat)
    model, opt = build("even", ONE)
    load_sharded(src, model, opt, ONE)  # one process reads what 4 wrote
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, four["even_ep2"]["state"][name]), name


def test_save_leaves_no_temporary_directory(reference, four):
    names = sorted(p.name for p in reference["tmp"].iterdir())
    assert not [n for n in names if ".tmp-" in n]
    assert {"config.json", "extra_state.pt", "dcp"} <= {p.name for p in (reference["tmp"] / "even_ep2_end").iterdir()}


def test_save_model_checkpoint_converts_to_sharded_and_back(tmp_path):
    torch.manual_seed(0)
    model = Transformer(CONFIGS["uneven"])
    save_model(model, tmp_path / "plain")  # model only: no trainer_state.pt
    back = sharded_to_single(single_to_sharded(tmp_path / "plain", tmp_path / "sharded"), tmp_path / "back")
    assert not (back / TRAINER_STATE_FILE).exists()
    original = read_safetensors(tmp_path / "plain" / MODEL_FILE)
    assert read_safetensors(back / MODEL_FILE).keys() == original.keys()
    assert all(torch.equal(read_safetensors(back / MODEL_FILE)[k], v) for k, v in original.items())


def test_loading_into_another_model_is_refused(tmp_path):
    model, opt = build("even", ONE)
    save_sharded(tmp_path / "even", model, opt, ONE)
    other, other_opt = build("uneven", ONE)
    with pytest.raises(ValueError, match="config.json: the model config differs"):
        load_sharded(tmp_path / "even", other, other_opt, ONE)
    with pytest.raises(TypeError, match="AdamW"):
        save_sharded(tmp_path / "sgd", model, torch.optim.SGD(model.parameters(), lr=0.1), ONE)
    assert not (tmp_path / "sgd").exists()
