"""A fresh FSDP2 + EP model is built on the meta device and only each rank's shards are materialised: its weights,
all-gathered, equal one process's `Transformer(config)` at the same seed exactly, and the CPU generator ends where
that build leaves it; a model built for a checkpoint to fill draws nothing. 2 CPU processes (gloo), one spawn."""

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
from deepseekmoe.distributed import init_parallel
from deepseekmoe.distributed.fsdp import gather_full_state
from deepseekmoe.distributed.plan import FullySharded

pytestmark = pytest.mark.slow  # one spawn of 2 processes

# ep=1: 7 experts cut by FSDP over dp=2 as 4 + 3 rows; ep=2: blocks of 4 and 3, whole on a dp mesh of one; a tied
# head (drawn twice, the second draw kept) and a hash router (a table, not a weight)
LAYOUTS = {"uneven_ep1": (tiny_config(n_routed_experts=7), 1), "uneven_ep2": (tiny_config(n_routed_experts=7), 2),
           "tied_hash_ep2": (tiny_config(tie_word_embeddings=True, router="hash", num_experts_per_tok=1), 2)}
SEED = 3


def _layout(config, ep: int) -> dict:
    parallel = init_parallel(ep=ep, n_routed_experts=config.n_routed_experts)
    plan = FullySharded(parallel)
    torch.manual_seed(SEED)
    model, _ = plan.build(config)
    rng = torch.get_rng_state()
    state, _ = gather_full_state(model)
    before = torch.get_rng_state()
    plan.build(config, initialise=False)
    return {"state": state, "rng": rng, "no_draws": torch.equal(before, torch.get_rng_state()),
            "dtensors": all(type(p).__name__ == "DTensor" for p in model.parameters())}


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    out = {name: _layout(*layout) for name, layout in LAYOUTS.items()}
    if rank == 0:
        torch.save(out, Path(tmp) / "init.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("fsdp_init")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(tmp)), nprocs=2)
    return torch.load(tmp / "init.pt", weights_only=False)


@pytest.mark.parametrize("name", LAYOUTS)
def test_sharded_initialisation_is_the_single_process_one_exactly(sharded, name):
    torch.manual_seed(SEED)
    reference = Transformer(LAYOUTS[name][0])
    got = sharded[name]
    assert got["dtensors"]  # it was sharded
    expected = reference.state_dict()
    assert got["state"].keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(got["state"][key], tensor), key
    assert torch.equal(got["rng"], torch.get_rng_state())  # the same draws, in the same order
    assert got["no_draws"]
