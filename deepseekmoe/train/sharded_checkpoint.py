"""Sharded training checkpoints (torch.distributed.checkpoint): every rank writes its own shards, any layout reads them.

DIR/
    dcp/                 .metadata + one __<rank>_0.distcp file per writing rank (DCP's FileSystemWriter)
    config.json          the model config, as in every checkpoint
    extra_state.pt       optimizer hyper-parameters (param_groups) and the parameter names in optimizer order,
                         plus what the caller adds (scheduler, RNG, progress); written by rank 0
    (tokenizer.json, run_config.yaml when given)

Keys in dcp/ name full-model tensors, whatever layout wrote them:
    model.<name>                       a dense tensor (saved as the FSDP shards or the replicated tensor)
    model.<name>.<e>                   routed expert e of a stacked expert weight (gate_up_proj, down_proj)
    optim.<name>.step | .exp_avg | .exp_avg_sq | .<e> for experts: the AdamW state of that parameter
Experts are saved one key per expert because expert parallelism cuts the stack into per-rank blocks that FSDP then
cuts again over dp, in proportions DTensor cannot describe (`expert_bounds` blocks differ by one when ep does not
divide E); one expert lives whole on one rank, so any (dp, ep) layout reads exactly the experts it holds. Dense
tensors are DTensors, which DCP reshards to the reading layout by itself.

`save_sharded` and `load_sharded` are collective; the trainer saves through them under `train --fsdp` (state.py) and
resumes from them under any plan. `sharded_to_single` / `single_to_sharded` (`convert --from-sharded` /
`--to-sharded`) convert offline, in one process, to and from the single-file checkpoint (model.safetensors,
config.json, trainer_state.pt with the positional full optimizer state of `train.state`), so a sharded checkpoint
exports to HF through it.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor

from ..checkpoint import find_checkpoint, is_sharded, load_checkpoint, write_model_files
from ..config import ModelConfig
from ..distributed.expert_parallel import ExpertParallelExperts
from ..distributed.fsdp import local_tensor
from ..distributed.mesh import Parallel
from ..errors import UserValueError
from ..fileio import atomic_directory, commit_directory, sync_tree, written_atomically
from ..filenames import (CHECKPOINT_RUN_CONFIG_FILE, CONFIG_FILE, SHARDED_DIR, SHARDED_EXTRA_FILE, TOKENIZER_FILE,
                         TRAINER_STATE_FILE)
from ..model import Transformer
from ..model.experts import RoutedExperts
from .optim import param_groups

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def _dcp(fn, state: dict[str, Any], path: Path, distributed: bool, **kwargs: Any) -> None:
    """dcp.save or dcp.load; in one process without its 'assuming the intent is ... a single process' warning."""
    with warnings.catch_warnings():
        if not distributed:
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        fn(state, checkpoint_id=path, no_dist=not distributed, **kwargs)


def expert_rows(t: torch.Tensor, module: ExpertParallelExperts | None, num_experts: int) -> dict[int, torch.Tensor]:
    """Global expert id -> this rank's (view of its) rows of a stacked expert tensor: the EP block, cut by FSDP over
    dp in torch.chunk proportions along dim 0 (ceil(L/dp) experts per rank, the last ranks fewer or none)."""
    local = local_tensor(t)
    first, count = (module.first, module.num_local) if module is not None else (0, num_experts)
    offset = 0
    if isinstance(t, DTensor):
        mesh = t.device_mesh
        per_rank = -(-count // mesh.size())
        offset = min(mesh.get_local_rank() * per_rank, count)
        if local.shape[0] != min(per_rank, count - offset):
            raise AssertionError(f"unexpected FSDP shard of {tuple(t.shape)}: {tuple(local.shape)}")
    return {first + offset + k: local[k] for k in range(local.shape[0])}


def _experts_of(model: nn.Module) -> dict[str, ExpertParallelExperts | None]:
    """Parameter name -> its ExpertParallelExperts module (None for the full experts of one process), experts only."""
    out: dict[str, ExpertParallelExperts | None] = {}
    for prefix, module in model.named_modules():
        if isinstance(module, RoutedExperts):
            owner = module if isinstance(module, ExpertParallelExperts) else None
            for name, _ in module.named_parameters(recurse=False):
                out[f"{prefix}.{name}"] = owner
    return out


def _add(flat: dict[str, Any], key: str, t: torch.Tensor, experts: dict, name: str, num_experts: int) -> None:
    if name in experts:
        flat.update({f"{key}.{e}": row for e, row in expert_rows(t, experts[name], num_experts).items()})
    else:
        flat[key] = t


def optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter names in the optimizer's positional order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def flat_state(model: Transformer, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """The DCP state of this rank: views into the model's and optimizer's own tensors (loading writes in place)."""
    experts, e = _experts_of(model), model.config.n_routed_experts or 0
    flat: dict[str, Any] = {}
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name, t in state.items():
        _add(flat, f"model.{name}", t, experts, name, e)
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        for p in (p for group in optimizer.param_groups for p in group["params"]):
            name, entry = names[id(p)], optimizer.state[p]
            flat[f"optim.{name}.step"] = entry["step"]
            for k in ADAM_KEYS:
                _add(flat, f"optim.{name}.{k}", entry[k], experts, name, e)
    return flat


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's state tensors (step 0, zero moments) for parameters without state, so a load can fill them."""
    if not isinstance(optimizer, torch.optim.AdamW) or any(g.get("amsgrad") for g in optimizer.param_groups):
        raise TypeError(f"sharded checkpoints hold AdamW state (amsgrad off), not {type(optimizer).__name__}")
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def _extra(model: nn.Module, optimizer: torch.optim.Optimizer | None, extra: dict | None) -> dict[str, Any]:
    out = dict(extra or {})
    if optimizer is not None:
        out["param_groups"] = optimizer.state_dict()["param_groups"]
        out["param_names"] = optimizer_names(model, optimizer)
    return out


def _write_side_files(tmp: Path, config: ModelConfig, extra: dict, tokenizer_path: Path | None,
                      run_config_yaml: str | None) -> None:
    (tmp / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    torch.save(extra, tmp / SHARDED_EXTRA_FILE)
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
    if run_config_yaml is not None:
        (tmp / CHECKPOINT_RUN_CONFIG_FILE).write_text(run_config_yaml)


def save_sharded(directory: str | Path, model: Transformer, optimizer: torch.optim.Optimizer | None,
                 parallel: Parallel, extra: dict | None = None, tokenizer_path: str | Path | None = None,
                 run_config_yaml: str | None = None) -> Path:
    """Every rank writes its shards into a temporary sibling of `directory`; rank 0 adds the side files, flushes
    and renames it into place. Collective."""
    final = Path(directory)
    if optimizer is not None:
        init_optimizer_state(optimizer)  # a save before the first step: the state AdamW would start from
    box = [str(atomic_directory(final)) if parallel.is_main else None]
    if parallel.is_distributed:
        dist.broadcast_object_list(box, src=0)
    tmp = Path(box[0])  # type: ignore[arg-type]
    _dcp(dcp.save, flat_state(model, optimizer), tmp / SHARDED_DIR, parallel.is_distributed)
    if parallel.is_main:
        try:
            _write_side_files(tmp, model.config, _extra(model, optimizer, extra),
                              Path(tokenizer_path) if tokenizer_path else None, run_config_yaml)
            sync_tree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        commit_directory(tmp, final)
    if parallel.is_distributed:
        dist.barrier()
    return final


def read_extra(directory: str | Path) -> dict[str, Any]:
    return torch.load(Path(directory) / SHARDED_EXTRA_FILE, map_location="cpu", weights_only=False)


def load_sharded(directory: str | Path, model: Transformer, optimizer: torch.optim.Optimizer | None,
                 parallel: Parallel) -> dict[str, Any]:
    """Fill the (already parallelized) model and its optimizer in place from a sharded checkpoint written at any
    layout; returns the extra state. Collective."""
    directory = Path(directory)
    saved = ModelConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    if saved.replace(n_device_groups=1) != model.config.replace(n_device_groups=1):
        raise UserValueError(f"{directory / CONFIG_FILE}: the model config differs from the model being loaded")
    if optimizer is not None:
        init_optimizer_state(optimizer)
    _dcp(dcp.load, flat_state(model, optimizer), directory / SHARDED_DIR, parallel.is_distributed)
    extra = read_extra(directory)
    if optimizer is not None:
        for group, saved_group in zip(optimizer.param_groups, extra["param_groups"]):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
    return extra


# ------------------------------------------------------------------ offline conversion (one process)
def read_sharded(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of dcp/ at full size, assembled from all ranks' shards, keyed as written."""
    path = Path(directory) / SHARDED_DIR
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    flat = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()}
    _dcp(dcp.load, flat, path, False)
    return flat


def _stack(flat: dict[str, torch.Tensor], prefix: str, name: str, num_experts: int) -> torch.Tensor:
    key = f"{prefix}.{name}"
    if key in flat:
        return flat[key]
    return torch.stack([flat[f"{key}.{e}"] for e in range(num_experts)])


def sharded_to_single(src: str | Path, dst: str | Path) -> Path:
    """A sharded checkpoint (or a run's latest) -> a single-file one (model.safetensors, config.json;
    trainer_state.pt with the full positional optimizer state when the checkpoint has one), written atomically."""
    src = find_checkpoint(src, sharded=True)
    if not is_sharded(src):
        raise UserValueError(f"{src} is a single-file checkpoint, not a sharded one")
    config = ModelConfig.from_dict(json.loads((src / CONFIG_FILE).read_text()))
    flat, extra, e = read_sharded(src), read_extra(src), config.n_routed_experts or 0
    with torch.device("meta"):
        model = Transformer(config)
    names = [n for n in model.state_dict() if not (config.tie_word_embeddings and n == "lm_head.weight")]
    model.load_state_dict({n: _stack(flat, "model", n, e) for n in names}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    with written_atomically(Path(dst)) as tmp:
        write_model_files(model, tmp, src / TOKENIZER_FILE if (src / TOKENIZER_FILE).is_file() else None)
        if "param_names" in extra:
            torch.save(_trainer_state(flat, extra, e), tmp / TRAINER_STATE_FILE)
        if (src / CHECKPOINT_RUN_CONFIG_FILE).is_file():
            shutil.copyfile(src / CHECKPOINT_RUN_CONFIG_FILE, tmp / CHECKPOINT_RUN_CONFIG_FILE)
    return Path(dst)


def _trainer_state(flat: dict[str, torch.Tensor], extra: dict, num_experts: int) -> dict[str, Any]:
    state = {i: {"step": flat[f"optim.{n}.step"], **{k: _stack(flat, "optim", f"{n}.{k}", num_experts)
                                                    for k in ADAM_KEYS}}
             for i, n in enumerate(extra["param_names"])}
    out = {k: v for k, v in extra.items() if k not in ("param_groups", "param_names")}
    return {**out, "optimizer": {"state": state, "param_groups": extra["param_groups"]}}


def single_to_sharded(src: str | Path, dst: str | Path) -> Path:
    """A single-file checkpoint (with or without trainer_state.pt) -> a sharded one, written by this one process;
    loads at any layout like one that torchrun wrote."""
    model, ckpt = load_checkpoint(src)
    optimizer, extra = None, None
    if (ckpt / TRAINER_STATE_FILE).is_file():
        extra = torch.load(ckpt / TRAINER_STATE_FILE, map_location="cpu", weights_only=True)
        optimizer = torch.optim.AdamW(param_groups(model, 0.0))
        optimizer.load_state_dict(extra.pop("optimizer"))  # scheduler, rng, progress stay in extra
    tokenizer = ckpt / TOKENIZER_FILE
    run_yaml = ckpt / CHECKPOINT_RUN_CONFIG_FILE
    return save_sharded(dst, model, optimizer, Parallel(None, 1, 1, 0, torch.device("cpu")), extra,
                        tokenizer if tokenizer.is_file() else None,
                        run_yaml.read_text() if run_yaml.is_file() else None)
