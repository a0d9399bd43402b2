"""Expert + data parallelism on 2 CPU processes (gloo) against the single-process model.

All 2-process scenarios run in ONE spawn (module fixture `two_ranks`; process start-up dominates the cost); each
test then compares what the ranks recorded with a single-process computation done here.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import tiny_config
from train_helpers import make_data_dir, read_metrics, tiny_overrides
from deepseekmoe import MoE, Transformer
from deepseekmoe.cli import main as cli_main
from deepseekmoe.distributed import Parallel, all_to_all, clip_grad_norm_, init_parallel, local_batch, parallelize
from deepseekmoe.distributed.expert_parallel import ExpertParallelExperts, full_model
from deepseekmoe.distributed.plan import resolve_plan
from deepseekmoe.distributed.training import gather_optimizer_state, shard_optimizer_state
from deepseekmoe.losses import device_balance_loss, total_loss
from deepseekmoe.model.experts import experts_loop
from deepseekmoe.checkpoint import save_model
from deepseekmoe.convert.load import load_model
from deepseekmoe.train.config import RunConfig

pytestmark = pytest.mark.slow  # one 2-process spawn for the module: ~10-20 s on 2 busy cores

STEPS, BATCH, SEQ = 5, 4, 8
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 sums split differently (ranks, MKL kernels): cancellation leaves ~1e-6
UNEVEN = tiny_config(n_routed_experts=7)


def model_config():
    return tiny_config(device_aux_loss_alpha=0.05, n_device_groups=2, aux_loss_alpha=0.01)


def all_reduce_mean(value: torch.Tensor, parallel: Parallel) -> torch.Tensor:
    """Mean of a tensor over all ranks (a copy)."""
    value = value.detach().clone()
    if parallel.is_distributed:
        dist.all_reduce(value)
        value /= parallel.world_size
    return value


def save_full_checkpoint(model: Transformer, parallel: Parallel, directory: str | Path,
                         tokenizer_path: str | Path | None = None) -> Path:
    """Gather the full single-device state to rank 0 and write it with save_model, so the
    checkpoint loads at any world size (the loader slices each rank's experts again). Collective."""
    full = full_model(model)
    if parallel.is_main:
        save_model(full, directory, tokenizer_path)
    if parallel.is_distributed:
        dist.barrier()
    return Path(directory)


def batches(config, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, config.vocab_size, (BATCH, SEQ + 1), generator=g) for _ in range(n)]


def train(model: Transformer, parallel: Parallel, data: list[torch.Tensor]) -> tuple[list[float], torch.optim.AdamW]:
    """AdamW steps on the global batches; returns the global (rank-averaged) loss of each step, and the optimizer."""
    module = parallelize(model, parallel)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    losses = []
    for batch in data:
        batch = local_batch(batch, parallel)
        out = module(batch[:, :-1])
        loss = total_loss(out.logits, batch[:, 1:], out.router_outputs, model.config).total
        loss.backward()
        clip_grad_norm_(model, 0.05, parallel)  # small, so clipping is active
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(all_reduce_mean(loss, parallel).item())
    return losses, opt


def next_loss(model: Transformer, parallel: Parallel, batch: torch.Tensor) -> float:
    batch = local_batch(batch, parallel)
    with torch.no_grad():
        out = model(batch[:, :-1])
        loss = total_loss(out.logits, batch[:, 1:], out.router_outputs, model.config).total
    return all_reduce_mean(loss, parallel).item()


# ------------------------------------------------------------------ what each rank does
def _moe_layer(parallel: Parallel, config) -> dict:
    """One MoE layer, EP=2: each rank feeds 2 of the 4 sequences."""
    torch.manual_seed(0)
    moe = MoE(config)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
    moe.experts = ExpertParallelExperts(moe.experts, parallel.ep_group)
    x = local_batch(torch.randn(4, 3, 32, generator=torch.Generator().manual_seed(2)), parallel)
    x.requires_grad_(True)
    w = local_batch(torch.randn(4, 3, 32, generator=torch.Generator().manual_seed(3)), parallel)
    y, routing = moe(x)
    (y * w).sum().backward()
    return {"y": y.detach(), "x_grad": x.grad, "grads": {n: p.grad for n, p in moe.named_parameters()},
            "dev_loss": device_balance_loss(routing, 1.0, 2).detach() if config.n_routed_experts % 2 == 0 else None}


def _skewed(parallel: Parallel, target: int) -> dict:
    """Every (token, slot) goes to the experts of EP rank `target`; the other rank receives nothing."""
    torch.manual_seed(0)
    moe = MoE(model_config())
    with torch.no_grad():
        moe.experts.gate_up_proj.normal_(0, 0.2)
        moe.experts.down_proj.normal_(0, 0.2)
    ep = ExpertParallelExperts(moe.experts, parallel.ep_group)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 32, generator=g)[parallel.rank * 3:(parallel.rank + 1) * 3].requires_grad_(True)
    idx = torch.tensor([[0, 1], [3, 2], [1, 3]]) + 4 * target
    gates = torch.rand(3, 2, generator=g)
    y = ep(x, idx, gates)
    y.pow(2).sum().backward()
    return {"y": y.detach(), "x_grad": x.grad, "gate_up_grad": ep.gate_up_proj.grad, "down_grad": ep.down_proj.grad}


def _a2a_empty(parallel: Parallel) -> torch.Tensor:
    """A rank that sends nothing at all (0 rows) still takes part, forward and backward."""
    rows = [0, 0] if parallel.rank == 1 else [2, 1]
    x = torch.full((sum(rows), 2), float(parallel.rank + 1), requires_grad=True)
    recv = [2, 0] if parallel.rank == 0 else [1, 0]
    y = all_to_all(x, recv, rows, parallel.ep_group)
    (y * 10).sum().backward()
    return x.grad if x.grad is not None else torch.zeros(0, 2)


def _training(parallel: Parallel, ckpt_in: Path, ckpt_out: Path) -> dict:
    data = batches(model_config(), STEPS + 1)
    model, _ = load_model(ckpt_in)  # saved by one process: 1 -> 2 processes
    model.train()
    losses, opt = train(model, parallel, data[:STEPS])
    save_full_checkpoint(model, parallel, ckpt_out)
    full_opt = gather_optimizer_state(opt, model)
    local = shard_optimizer_state(full_opt, opt, model)["state"]
    round_trip = all(torch.equal(v, opt.state_dict()["state"][i][k]) for i, s in local.items() for k, v in s.items())
    return {"losses": losses, "next": next_loss(model, parallel, data[STEPS]), "opt": full_opt["state"],
            "round_trip": round_trip}


def _default_device_groups(parallel: Parallel) -> tuple[int, str]:
    """The run config as the trainer's plan resolves it at ep=2, and the plan's kind."""
    run, plan = resolve_plan(RunConfig(model=tiny_config()), parallel.ep, parallel.device)
    return run.model.n_device_groups, type(plan).__name__


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    tmp_path = Path(tmp)
    ep2 = init_parallel(ep=2, n_routed_experts=8)
    dp2 = init_parallel(ep=1)
    out = {
        "moe": _moe_layer(ep2, model_config()),
        "moe_uneven": _moe_layer(ep2, UNEVEN),  # 7 experts: blocks of 4 and 3
        "skew0": _skewed(ep2, 0), "skew1": _skewed(ep2, 1),
        "a2a_empty": _a2a_empty(ep2),
        "default_groups": _default_device_groups(ep2),
        "ep_train": _training(ep2, tmp_path / "init", tmp_path / "ep_ckpt"),
        "dp_train": _training(dp2, tmp_path / "init", tmp_path / "dp_ckpt"),
    }
    torch.save(out, tmp_path / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[list[dict], Path]:
    tmp = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    save_model(Transformer(model_config()), tmp / "init")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp)), nprocs=2)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)], tmp


def _single_moe(config):
    torch.manual_seed(0)
    moe = MoE(config)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(4, 3, 32, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    w = torch.randn(4, 3, 32, generator=torch.Generator().manual_seed(3))
    y, routing = moe(x)
    (y * w).sum().backward()
    return moe, x, y, routing


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("kind", ["moe", "moe_uneven"])
def test_moe_layer_ep2_matches_single_process(two_ranks, kind):
    ranks, _ = two_ranks
    moe, x, y, _ = _single_moe(model_config() if kind == "moe" else UNEVEN)
    torch.testing.assert_close(torch.cat([r[kind]["y"] for r in ranks]), y.detach(), **TOL)
    torch.testing.assert_close(torch.cat([r[kind]["x_grad"] for r in ranks]), x.grad, **TOL)
    for name, p in moe.named_parameters():
        parts = [r[kind]["grads"][name] for r in ranks]
        # expert weights: each rank holds its block, with gradients from both ranks' tokens;
        # replicated weights (router, shared experts): each rank has its own tokens' share
        full = torch.cat(parts) if name.startswith("experts.") else parts[0] + parts[1]
        torch.testing.assert_close(full, p.grad, **TOL, msg=lambda m, name=name: f"{name}: {m}")


def test_device_balance_loss_ep2_equals_two_groups(two_ranks):
    ranks, _ = two_ranks
    _, _, _, routing = _single_moe(model_config())
    expected = device_balance_loss(routing, 1.0, 2)
    got = (ranks[0]["moe"]["dev_loss"] + ranks[1]["moe"]["dev_loss"]) / 2  # mean over sequences
    torch.testing.assert_close(got, expected.detach(), **TOL)
    assert ranks[0]["default_groups"] == (2, "DataParallel")  # ep=2 makes the EP ranks the devices


@pytest.mark.parametrize("target", [0, 1])
def test_skewed_routing_and_rank_without_tokens(two_ranks, target):
    ranks, _ = two_ranks
    torch.manual_seed(0)
    moe = MoE(model_config())
    with torch.no_grad():
        moe.experts.gate_up_proj.normal_(0, 0.2)
        moe.experts.down_proj.normal_(0, 0.2)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 32, generator=g).requires_grad_(True)
    idx = torch.tensor([[0, 1], [3, 2], [1, 3]]).repeat(2, 1) + 4 * target
    gates = torch.rand(3, 2, generator=g).repeat(2, 1)  # each rank drew the same 3 x 2 gates after x
    res = [r[f"skew{target}"] for r in ranks]
    y = experts_loop(x, idx, gates, moe.experts.gate_up_proj, moe.experts.down_proj)
    y.pow(2).sum().backward()
    torch.testing.assert_close(torch.cat([r["y"] for r in res]), y.detach(), **TOL)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in res]), x.grad, **TOL)
    block = slice(4 * target, 4 * target + 4)
    torch.testing.assert_close(res[target]["gate_up_grad"], moe.experts.gate_up_proj.grad[block], **TOL)
    torch.testing.assert_close(res[target]["down_grad"], moe.experts.down_proj.grad[block], **TOL)
    idle = res[1 - target]  # received no rows: its experts still get (zero) gradients
    assert idle["gate_up_grad"] is not None and idle["gate_up_grad"].abs().sum() == 0


def test_all_to_all_with_an_empty_rank(two_ranks):
    ranks, _ = two_ranks
    # rank 0 sends 2 rows to itself and 1 to rank 1; rank 1 sends nothing; each received row's grad is 10
    torch.testing.assert_close(ranks[0]["a2a_empty"], torch.full((3, 2), 10.0))
    assert ranks[1]["a2a_empty"].shape == (0, 2)


@pytest.fixture(scope="module")
def single_process(two_ranks) -> tuple[list[float], float, dict]:
    _, tmp = two_ranks
    model, _ = load_model(tmp / "init")
    model.train()
    data = batches(model.config, STEPS + 1)
    parallel = Parallel(None, 1, 1, 0, torch.device("cpu"))
    losses, opt = train(model, parallel, data[:STEPS])
    return losses, next_loss(model, parallel, data[STEPS]), opt.state_dict()["state"]


@pytest.mark.parametrize("kind", ["ep_train", "dp_train"])
def test_five_steps_match_single_process(two_ranks, single_process, kind):
    ranks, _ = two_ranks
    expected, _, _ = single_process
    assert ranks[0][kind]["losses"] == ranks[1][kind]["losses"]
    assert expected[0] != expected[-1]  # the model actually trained
    torch.testing.assert_close(torch.tensor(ranks[0][kind]["losses"]), torch.tensor(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["ep", "dp"])
def test_checkpoint_from_two_processes_resumes_at_one(two_ranks, kind):
    ranks, tmp = two_ranks
    model, _ = load_model(tmp / f"{kind}_ckpt")
    assert model.layers[0].mlp.experts.gate_up_proj.shape[0] == 8  # full, not one rank's block
    data = batches(model.config, STEPS + 1)
    got = next_loss(model, Parallel(None, 1, 1, 0, torch.device("cpu")), data[STEPS])
    assert got == pytest.approx(ranks[0][f"{kind}_train"]["next"], rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("kind", ["ep_train", "dp_train"])
def test_gathered_optimizer_state_equals_single_process(two_ranks, single_process, kind):
    ranks, _ = two_ranks
    _, _, expected = single_process
    got = ranks[0][kind]["opt"]
    assert got.keys() == expected.keys()
    for i, entry in expected.items():
        for key, value in entry.items():  # full-size exp_avg / exp_avg_sq, expert ones gathered over EP
            torch.testing.assert_close(got[i][key], value, rtol=1e-4, atol=1e-7, msg=f"{i} {key}")
    assert ranks[0][kind]["round_trip"] and ranks[1][kind]["round_trip"]  # sharding the gathered state again


def test_device_load_uses_the_ep_blocks():
    from deepseekmoe.distributed.training import device_load

    counts_LE = torch.tensor([[1, 2, 3, 4, 5], [0, 0, 0, 0, 5]])  # 5 experts over 2 devices: [0, 3) and [3, 5)
    assert device_load(counts_LE, 2) == pytest.approx([6 / 20, 14 / 20])


# ------------------------------------------------------------------ the train command under torchrun
def _torchrun(args: list[str], cwd: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "deepseekmoe", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


def test_torchrun_train_ep2_matches_one_process_and_checkpoints_move_both_ways(tmp_path: Path):
    data = make_data_dir(tmp_path / "data")
    args = [*tiny_overrides(max_steps=4, save_every=2), "model.device_aux_loss_alpha=0.05"]
    assert cli_main(["train", *args, "model.n_device_groups=2", "--data", str(data), "--out",
                     str(tmp_path / "one")]) == 0
    # with --ep 2, n_device_groups defaults to the 2 EP ranks
    _torchrun([*args, "--data", str(data), "--ep", "2", "--out", str(tmp_path / "two")], tmp_path)
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(two) == 4
    assert two == pytest.approx(one, rel=1e-5)
    assert len(read_metrics(tmp_path / "two")[0]["device_load"]) == 2  # the EP ranks' shares are logged
    # 2 -> 1: drop the last checkpoint of the 2-process run and resume it with one process
    shutil.copytree(tmp_path / "one", tmp_path / "one_cut")
    for run in ("two", "one_cut"):
        shutil.rmtree(tmp_path / run / "checkpoints" / "step_00000004")
    assert cli_main(["train", "--resume", "--out", str(tmp_path / "two")]) == 0
    assert _losses(tmp_path / "two") == pytest.approx(one, rel=1e-5)
    # 1 -> 2: resume the one-process run with two processes
    _torchrun(["--resume", "--ep", "2", "--out", str(tmp_path / "one_cut")], tmp_path)
    assert _losses(tmp_path / "one_cut") == pytest.approx(one, rel=1e-5)
