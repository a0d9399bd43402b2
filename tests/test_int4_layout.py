"""int4 byte layouts: each one against PyTorch's own packing on the CPU capability it belongs to, round trips back
to rows, the streamed writer's blocks against packing whole matrices, a checkpoint's int4 weights used as views of
its file, and a checkpoint written for one CPU's kernel loaded under another's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepseekmoe import Transformer
from deepseekmoe.convert import quantize as convert_quantize
from deepseekmoe.convert.quantize import MemorySink, QuantizingWriter, convert_quantized, quantized_entries
from deepseekmoe.inference.loading import load_weights
from deepseekmoe.model import quantized
from deepseekmoe.model.int4_layout import LAYOUTS, from_layout, kernel_layout, relayout, to_layout
from deepseekmoe.model.quantized import QuantizedWeight, quantize_int4, quantized_linear
from deepseekmoe.checkpoint import save_model
from test_generate import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CAPABILITY_LAYOUTS = {"avx2": "blocked32-halves", "default": "blocked32-pairs"}


def _nibbles(rows: int, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values int32 (rows, columns) in [0, 15], the same as rows of nibbles (rows, columns / 2))."""
    values = torch.randint(0, 16, (rows, columns), dtype=torch.int32)
    return values, (values[:, 0::2] | (values[:, 1::2] << 4)).to(torch.uint8)


@pytest.mark.parametrize("rows", [16, 48, 64, 208, 4096 + 80])  # short blocks; more than one chunk
def test_every_layout_round_trips_and_the_machines_is_torchs_packing(rows):
    values, nibbles = _nibbles(rows, 128)
    for layout in LAYOUTS:
        packed = to_layout(nibbles, layout)
        assert packed.shape == nibbles.shape and torch.equal(from_layout(packed, layout), nibbles)
    assert kernel_layout() is not None
    assert torch.equal(to_layout(nibbles, kernel_layout()),
                       torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1))


def test_blocked64_halves_by_hand():
    values, nibbles = _nibbles(64, 4)
    packed = to_layout(nibbles, "blocked64-halves").view(-1)
    # column k's 32 bytes: rows j and j + 32 for j < 32
    assert packed[0].item() == values[0, 0] | (values[32, 0] << 4)
    assert packed[31].item() == values[31, 0] | (values[63, 0] << 4)
    assert packed[32 * 3 + 5].item() == values[5, 3] | (values[37, 3] << 4)


def test_relayout_converts_stacked_experts():
    _, nibbles = _nibbles(3 * 80, 64)
    stacked = nibbles.view(3, 80, 32)
    source = torch.stack([to_layout(m, "blocked32-pairs") for m in stacked])
    target = relayout(source, "blocked32-pairs", "blocked64-halves")
    assert torch.equal(target, torch.stack([to_layout(m, "blocked64-halves") for m in stacked]))
    assert relayout(target, "blocked64-halves", "blocked64-halves") is target


@pytest.mark.parametrize("pieces", [[240], [1, 63, 70, 106], [50, 50, 50, 90], [7] * 34 + [2]])
def test_streamed_pieces_write_whole_blocks_in_the_layout(pieces):
    w = torch.randn(3, 80, 64)  # 3 matrices of 80 rows: blocks of 64 and a short one of 16
    entries = {"experts.down_proj": (torch.float32, (3, 80, 64))}
    sink = MemorySink(quantized_entries(entries, "int4", 32))
    writer = QuantizingWriter(sink, entries, "int4", 32, "blocked64-halves")
    rows, start = w.reshape(-1, 64), 0
    for n in pieces:
        writer.write("experts.down_proj", rows[start:start + n], start * 64)
        start += n
    writer.close()
    nibbles, scales = quantize_int4(w, 32)
    expected = torch.stack([to_layout(m, "blocked64-halves") for m in nibbles])
    assert torch.equal(sink.state["experts.down_proj"], expected)
    assert torch.equal(sink.state["experts.down_proj_scale"], scales)


def test_a_block_left_incomplete_is_an_error():
    entries = {"w": (torch.float32, (64, 64))}
    writer = QuantizingWriter(MemorySink(quantized_entries(entries, "int4", 32)), entries, "int4", 32,
                              "blocked64-halves")
    writer.write("w", torch.randn(40, 64))
    with pytest.raises(RuntimeError, match="never completed"):
        writer.close()


def test_kernel_reads_any_stored_layout_alike():
    q, s = quantize_int4(torch.randn(208, 128), 64)
    x = torch.randn(3, 128)
    expected = quantized_linear(x, QuantizedWeight.from_stored(q, s, torch.float32))
    for layout in LAYOUTS:
        w = QuantizedWeight.from_stored(to_layout(q, layout), s, torch.float32, layout)
        assert torch.equal(quantized_linear(x, w), expected)


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture
def int4_checkpoint(tmp_path: Path, make_config) -> tuple[Path, Path]:
    """(float checkpoint, the same converted to int4 with group size 32)."""
    config = make_config(hidden_size=64, moe_intermediate_size=80, intermediate_size=128, vocab_size=320,
                         first_k_dense_replace=1)
    train_tokenizer(tmp_path / "tokenizer.json")
    src = save_model(Transformer(config).eval(), tmp_path / "float", tmp_path / "tokenizer.json")
    return src, convert_quantized(src, tmp_path / "q4", "int4", 32)


def _file_mapped(ptr: int, path: Path) -> bool:
    """Whether address ptr lies in a mapping of `path` in this process."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, *rest = line.split()
        low, high = (int(a, 16) for a in span.split("-"))
        if low <= ptr < high and rest[-1] == str(path.resolve()):
            return True
    return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_int4_weights_are_views_of_the_checkpoint_file(int4_checkpoint):
    _, q4 = int4_checkpoint
    model = load_weights(q4)
    layers = model.layers
    for weight in (layers[1].mlp.experts.gate_up_proj, model.lm_head.weight, layers[0].mlp.down_proj.weight):
        assert weight.fmt == "int4" and _file_mapped(weight.data.data_ptr(), q4 / "model.safetensors")


def _logits(ckpt: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_weights(ckpt)(torch.arange(20).view(2, 10)).logits


def test_a_checkpoint_without_a_layout_is_rows_and_loads_alike(int4_checkpoint, tmp_path: Path, monkeypatch):
    src, q4 = int4_checkpoint
    monkeypatch.setattr(convert_quantize, "kernel_layout", lambda: None)
    rows = convert_quantized(src, tmp_path / "rows", "int4", 32)
    config = json.loads((rows / "config.json").read_text())
    assert config["quantization"]["int4_layout"] == "rows"
    del config["quantization"]["int4_layout"]  # as written before the field existed
    (rows / "config.json").write_text(json.dumps(config))
    assert torch.equal(_logits(rows), _logits(q4))
    monkeypatch.setattr(quantized, "kernel_layout", lambda: None)  # a kernel layout none of ours: torch packs
    assert torch.equal(_logits(rows), _logits(q4))


@pytest.mark.slow
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_a_checkpoint_loads_under_another_cpus_kernel(int4_checkpoint, tmp_path: Path, capability):
    """Written here, loaded where the kernel packs another layout: converted while loading, the same logits as a
    checkpoint written there; and that one loads here with this machine's logits."""
    src, q4 = int4_checkpoint
    code = ("import sys, torch; from pathlib import Path\n"
            "from deepseekmoe.convert.quantize import convert_quantized\n"
            "from deepseekmoe.inference.loading import load_weights\n"
            "if torch.backends.cpu.get_cpu_capability().lower() != sys.argv[5]: sys.exit(3)\n"
            "there = convert_quantized(sys.argv[1], sys.argv[3], 'int4', 32); ids = torch.arange(20).view(2, 10)\n"
            "with torch.no_grad(): a, b = (load_weights(Path(p))(ids).logits for p in (sys.argv[2], there))\n"
            "torch.save((a, b), sys.argv[4])")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "PYTHONPATH": str(ROOT)}
    there, result = tmp_path / "there", tmp_path / "logits.pt"
    run = subprocess.run([sys.executable, "-c", code, str(src), str(q4), str(there), str(result), capability],
                         env=env)
    if run.returncode == 3:
        pytest.skip(f"this CPU cannot run the {capability} kernels")
    assert run.returncode == 0
    here_there, there_there = torch.load(result)
    layout = json.loads((there / "config.json").read_text())["quantization"]["int4_layout"]
    assert torch.equal(here_there, there_there)
    assert layout == CAPABILITY_LAYOUTS[capability]
    assert torch.allclose(_logits(there), _logits(q4), atol=1e-5, rtol=0)


def test_an_unaligned_int4_expert_is_used_in_place():
    q, s = quantize_int4(torch.randn(2, 64, 128), 64)
    buffer = torch.empty(q.numel() + 1, dtype=torch.uint8)
    unaligned = buffer[1:].view(q.shape)
    unaligned.copy_(torch.stack([to_layout(m, kernel_layout()) for m in q]))
    w = QuantizedWeight.from_stored(unaligned, s, torch.float32, kernel_layout())
    x = torch.randn(3, 128)
    assert w[1].data.data_ptr() == unaligned[1].data_ptr() and w[1].data.data_ptr() % 64
    assert torch.equal(quantized_linear(x, w[1]), quantized_linear(x, QuantizedWeight.from_stored(q[1], s[1],
                                                                                                  torch.float32)))
