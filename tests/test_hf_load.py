"""The float HF directory on the CPU: the same state as reading it into memory, every tensor but the stacked experts
a view of its mapped shard, the experts never mapped, and the memory check counting only what is copied."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deepseekmoe import Transformer
from deepseekmoe.convert.hf import read_hf_state
from deepseekmoe.convert.hf_load import load_hf_model
from deepseekmoe.checkpoint import model_from_state
from deepseekmoe.convert.hf_load import copied_bytes, data_offsets, read_hf_state_mapped
from deepseekmoe.inference import loading
from test_convert import HF_CONFIG, write_official


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    return write_official(tmp_path / "hf")  # layer 1's experts span two shards


def _mapped_files(ptr: int) -> set[str]:
    """The files whose mappings in this process contain address ptr."""
    found = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split()
        low, high = (int(a, 16) for a in span.split("-"))
        if low <= ptr < high and len(rest) == 5:
            found.add(rest[-1])
    return found


def test_mapped_state_equals_the_read_state(hf_dir: Path):
    config, state = read_hf_state_mapped(hf_dir)
    _, expected = read_hf_state(hf_dir)
    assert state.keys() == expected.keys()
    for k in expected:
        assert state[k].dtype == expected[k].dtype == torch.bfloat16 and torch.equal(state[k], expected[k]), k


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_only_the_stacked_experts_are_copied(hf_dir: Path):
    _, state = read_hf_state_mapped(hf_dir)
    shards = {str(p.resolve()) for p in hf_dir.glob("*.safetensors")}
    for k, t in state.items():
        mapped = _mapped_files(t.data_ptr()) & shards
        assert (not mapped) if ".experts." in k else len(mapped) == 1, k
    expert_bytes = sum(t.nbytes for k, t in state.items() if ".experts." in k)
    assert copied_bytes(hf_dir) == expert_bytes > 0


def test_data_offsets_are_the_tensors_bytes(hf_dir: Path):
    shard = sorted(hf_dir.glob("*.safetensors"))[0]
    raw = shard.read_bytes()
    from safetensors.torch import load_file
    for k, t in load_file(str(shard)).items():
        first, end = data_offsets(shard)[k]
        assert raw[first:end] == t.view(-1).view(torch.uint8).numpy().tobytes()


def test_load_hf_model_generates_alike_from_the_mapped_weights(hf_dir: Path):
    model, _ = load_hf_model(hf_dir)
    config, state = read_hf_state(hf_dir)
    ref = Transformer(config)
    ref.load_state_dict(state, strict=True, assign=True)
    ids = torch.arange(12).view(2, 6) % HF_CONFIG["vocab_size"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref.eval()(ids).logits)


def test_the_memory_check_counts_the_copied_experts(hf_dir: Path, monkeypatch):
    need = copied_bytes(hf_dir)
    monkeypatch.setattr(loading, "available_memory", lambda: need)
    loading.check_fits_in_memory(hf_dir)  # the mapped rest need not fit
    monkeypatch.setattr(loading, "available_memory", lambda: need - 1)
    with pytest.raises(ValueError, match="routed experts"):
        loading.check_fits_in_memory(hf_dir)


@pytest.mark.parametrize("router", ["softmax_topk", "hash"])
def test_model_from_state_rebuilds_the_fixed_tables(make_config, router):
    hashed = router == "hash"
    config = make_config(router=router, num_experts_per_tok=1 if hashed else 2, tie_word_embeddings=hashed)
    model = Transformer(config).eval()
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight" or not hashed}
    built = model_from_state(config, state, torch.device("cpu"))
    assert not any(t.is_meta for t in [*built.parameters(), *built.buffers()])
    ids = torch.arange(10).view(1, 10)
    with torch.no_grad():
        assert torch.equal(built(ids).logits, model(ids).logits)
