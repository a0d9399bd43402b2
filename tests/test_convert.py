"""HF checkpoint import/export against a tiny random checkpoint written here in the official layout.

The fixture writes what deepseek-moe-16b-base ships (SPEC.md section 7), with its own hand-written key list: bf16
tensors in the remote code's module order, cut greedily into several shards such that one layer's routed experts
span two shards, a model.safetensors.index.json, a config.json with auto_map, and tokenizer files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from deepseekmoe import ModelConfig, Transformer, cli
from deepseekmoe.convert.hf_layout import hf_layout, is_hf_directory
from deepseekmoe.convert.hf_export import plan_shards
from deepseekmoe.units import parse_bytes
from deepseekmoe.checkpoint import save_model
from deepseekmoe.convert.load import load_model

HF_CONFIG = {  # field order and fixed values as in the released config.json, sizes shrunk
    "architectures": ["DeepseekForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig",
                 "AutoModel": "modeling_deepseek.DeepseekModel",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"},
    "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 16,
    "initializer_range": 0.02, "intermediate_size": 40, "max_position_embeddings": 64, "model_type": "deepseek",
    "moe_intermediate_size": 8, "moe_layer_freq": 1, "n_routed_experts": 4, "n_shared_experts": 2,
    "norm_topk_prob": False, "num_attention_heads": 2, "num_experts_per_tok": 2, "num_hidden_layers": 3,
    "num_key_value_heads": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 10000, "scoring_func": "softmax", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0", "use_cache": True, "vocab_size": 32,
}
SHARD_BYTES = 6000  # cuts layer 1's routed experts across two shards (checked in the fixture)


def _official_keys(c: dict) -> dict[str, tuple[int, ...]]:
    """The released checkpoint's keys and shapes, in the remote code's module order."""
    d, f, fs = c["hidden_size"], c["moe_intermediate_size"], c["moe_intermediate_size"] * c["n_shared_experts"]
    keys = {"model.embed_tokens.weight": (c["vocab_size"], d)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        keys.update({p + f"self_attn.{n}_proj.weight": (d, d) for n in "qkvo"})
        if i < c["first_k_dense_replace"]:
            ffn = c["intermediate_size"]
            keys.update({p + "mlp.gate_proj.weight": (ffn, d), p + "mlp.up_proj.weight": (ffn, d),
                         p + "mlp.down_proj.weight": (d, ffn)})
        else:
            for e in range(c["n_routed_experts"]):
                keys.update({p + f"mlp.experts.{e}.gate_proj.weight": (f, d),
                             p + f"mlp.experts.{e}.up_proj.weight": (f, d),
                             p + f"mlp.experts.{e}.down_proj.weight": (d, f)})
            keys[p + "mlp.gate.weight"] = (c["n_routed_experts"], d)
            keys.update({p + "mlp.shared_experts.gate_proj.weight": (fs, d),
                         p + "mlp.shared_experts.up_proj.weight": (fs, d),
                         p + "mlp.shared_experts.down_proj.weight": (d, fs)})
        keys.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)})
    keys.update({"model.norm.weight": (d,), "lm_head.weight": (c["vocab_size"], d)})
    return keys


def _tokenizer(vocab_size: int) -> Tokenizer:
    vocab = {"<bos>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def write_official(path: Path, config: dict = HF_CONFIG, drop: str | None = None,
                   extra: dict | None = None, reshape: str | None = None) -> Path:
    """Write a random bf16 HF checkpoint; `drop`/`extra`/`reshape` corrupt it for the error tests."""
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in _official_keys(config).items()}
    if reshape:
        tensors[reshape] = tensors[reshape][:-1]
    tensors.pop(drop, None)
    tensors.update(extra or {})
    shards, current, size = [], [], 0
    for k, t in tensors.items():  # greedy, as save_pretrained cuts shards
        if current and size + t.nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(k)
        size += t.nbytes
    shards.append(current)
    weight_map = {}
    for i, keys in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k] for k in keys}, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    _tokenizer(config["vocab_size"]).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>"}))
    return path


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    path = write_official(tmp_path / "hf")
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    files = {weight_map[f"model.layers.1.mlp.experts.{e}.{p}_proj.weight"] for e in range(4) for p in
             ("gate", "up", "down")}
    assert len(set(weight_map.values())) >= 3 and len(files) == 2  # several shards; layer 1's experts span two
    return path


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(name)))
    return out


def test_round_trip_is_exact(hf_dir: Path, tmp_path: Path):
    ours, back = tmp_path / "ours", tmp_path / "back"
    assert cli.main(["convert", "--from-hf", str(hf_dir), "--out", str(ours)]) == 0
    assert cli.main(["convert", "--to-hf", str(ours), "--out", str(back), "--max-shard-size", str(SHARD_BYTES)]) == 0
    original, again = _read_all(hf_dir), _read_all(back)
    assert set(again) == set(original)
    for k, t in original.items():
        assert again[k].dtype == torch.bfloat16 and torch.equal(again[k].view(torch.int16), t.view(torch.int16)), k
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert json.loads((back / "model.safetensors.index.json").read_text()) == index
    config = json.loads((back / "config.json").read_text())
    # the released fields, with the dtype under transformers 5's name and the remote code's auto_map (the released
    # one plus the sequence-classification head)
    expected = {k: v for k, v in HF_CONFIG.items() if k not in ("transformers_version", "torch_dtype")}
    expected["auto_map"] = {**HF_CONFIG["auto_map"],
                            "AutoModelForSequenceClassification": "modeling_deepseek.DeepseekForSequenceClassification"}
    assert {k: config[k] for k in expected} == expected and config["dtype"] == "bfloat16"
    assert "torch_dtype" not in config and config["transformers_version"] == "5.24.0"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (back / name).read_bytes() == (hf_dir / name).read_bytes()


def test_import_stacks_experts_and_keeps_bf16(hf_dir: Path, tmp_path: Path):
    ours = tmp_path / "ours"
    assert cli.main(["convert", "--from-hf", str(hf_dir), "--out", str(ours)]) == 0
    state, hf = load_file(str(ours / "model.safetensors")), _read_all(hf_dir)
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    gate_up, down = state["layers.2.mlp.experts.gate_up_proj"], state["layers.2.mlp.experts.down_proj"]
    assert gate_up.shape == (4, 16, 16) and down.shape == (4, 16, 8)
    assert torch.equal(gate_up[3, :8], hf["model.layers.2.mlp.experts.3.gate_proj.weight"])
    assert torch.equal(gate_up[3, 8:], hf["model.layers.2.mlp.experts.3.up_proj.weight"])
    assert torch.equal(down[1], hf["model.layers.2.mlp.experts.1.down_proj.weight"])
    assert torch.equal(state["layers.0.mlp.gate_proj.weight"], hf["model.layers.0.mlp.gate_proj.weight"])
    model, _ = load_model(ours)  # our loader accepts the result
    assert model.config.n_routed_experts == 4 and model.config.first_k_dense_replace == 1
    tok = Tokenizer.from_file(str(ours / "tokenizer.json"))
    assert tok.encode("w5 w7").ids == [5, 7]


def test_load_model_accepts_an_hf_directory(hf_dir: Path, tmp_path: Path):
    assert is_hf_directory(hf_dir) and not is_hf_directory(tmp_path)
    model, path = load_model(hf_dir)
    assert path == hf_dir and model.embed_tokens.weight.dtype == torch.bfloat16
    ours = tmp_path / "ours"
    cli.main(["convert", "--from-hf", str(hf_dir), "--out", str(ours)])
    native, _ = load_model(ours, dtype=torch.float32)
    ids = torch.randint(0, 32, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model.float()(ids).logits, native(ids).logits, rtol=0, atol=0)


def test_export_of_a_trained_checkpoint_matches_its_state(tmp_path: Path):
    config = ModelConfig.from_hf_dict(HF_CONFIG).replace(tie_word_embeddings=True)
    model = Transformer(config)
    save_model(model, tmp_path / "ckpt")
    assert cli.main(["convert", "--to-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "model.safetensors").is_file()  # small enough for one file: no index
    hf = _read_all(tmp_path / "hf")
    assert set(hf) == set(hf_layout(config)) and "lm_head.weight" not in hf
    gate_up = model.layers[1].mlp.experts.gate_up_proj.detach()
    assert torch.equal(hf["model.layers.1.mlp.experts.2.up_proj.weight"], gate_up[2, 8:])
    back, _ = load_model(tmp_path / "hf", dtype=torch.float32)
    ids = torch.randint(0, 32, (1, 6))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model.eval()(ids).logits)


def test_layout_matches_the_model_state_dict():
    for overrides in ({}, {"tie_word_embeddings": True}, {"n_shared_experts": 0, "num_key_value_heads": 1},
                      {"n_routed_experts": None, "router": "none"}):
        config = ModelConfig.from_hf_dict({**HF_CONFIG, **overrides})
        with torch.device("meta"):
            state = Transformer(config).state_dict()
        if config.tie_word_embeddings:
            state.pop("lm_head.weight")
        layout = hf_layout(config)
        numel = sum(math.prod(s) for s in layout.values())
        assert numel == sum(t.numel() for t in state.values())
        assert len([k for k in layout if ".experts." not in k]) == len([k for k in state if ".experts." not in k])


@pytest.mark.parametrize("corrupt, words", [
    ({"drop": "model.layers.1.mlp.experts.3.up_proj.weight"},
     ["missing tensor model.layers.1.mlp.experts.3.up_proj.weight", "[8, 16]"]),
    ({"extra": {"model.layers.1.mlp.experts.9.up_proj.weight": torch.zeros(8, 16, dtype=torch.bfloat16)}},
     ["unexpected tensor model.layers.1.mlp.experts.9.up_proj.weight", "[8, 16]"]),
    ({"reshape": "model.layers.2.mlp.gate.weight"},
     ["model.layers.2.mlp.gate.weight has shape [3, 16], expected [4, 16]"]),
])
def test_bad_checkpoints_give_one_clear_line(tmp_path: Path, capsys, corrupt: dict, words: list[str]):
    bad = write_official(tmp_path / "bad", **corrupt)
    assert cli.main(["convert", "--from-hf", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("deepseekmoe: error: ") and all(w in err[-1] for w in words), err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


def test_experts_of_one_layer_must_share_a_dtype(tmp_path: Path, capsys):
    key = "model.layers.2.mlp.experts.1.gate_proj.weight"
    bad = write_official(tmp_path / "bad", extra={key: torch.zeros(8, 16)})
    assert cli.main(["convert", "--from-hf", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert f"{key} has dtype torch.float32, but the other experts of its layer are torch.bfloat16" in \
        capsys.readouterr().err


def test_cli_argument_errors(hf_dir: Path, tmp_path: Path, capsys):
    assert cli.main(["convert", "--out", str(tmp_path / "x")]) == 2
    assert cli.main(["convert", "--from-hf", str(hf_dir), "--out", str(hf_dir)]) == 2
    assert cli.main(["convert", "--to-hf", str(hf_dir), "--out", str(tmp_path / "y"), "--max-shard-size", "lots"]) == 2
    err = capsys.readouterr().err
    assert "exactly one of --from-hf" in err and "is the source directory" in err and "'lots' is invalid" in err
    ours = tmp_path / "ours"
    assert cli.main(["convert", "--from-hf", str(hf_dir), "--out", str(ours)]) == 0
    assert cli.main(["convert", "--from-hf", str(ours), "--out", str(tmp_path / "z")]) == 2
    assert cli.main(["convert", "--to-hf", str(hf_dir), "--out", str(tmp_path / "z")]) == 2
    err = capsys.readouterr().err
    assert "is not a Hugging Face DeepSeekMoE directory" in err and "is already a Hugging Face directory" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert cli.main(["convert", "--from-hf", str(hf_dir), "--out", str(tmp_path / "full")]) == 2
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    capsys.readouterr()
    files = sorted(p.name for p in hf_dir.iterdir())  # an --out that contains the source, even with --overwrite
    assert cli.main(["convert", "--from-hf", str(hf_dir), "--out", str(tmp_path), "--overwrite"]) == 2
    assert "contains the source" in capsys.readouterr().err and sorted(p.name for p in hf_dir.iterdir()) == files


def test_sizes_and_greedy_shards():
    assert parse_bytes("5GB") == 5 * 10**9 and parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("1500") == 1500
    assert parse_bytes("400GB/s") == 4e11 and parse_bytes(" 1.5 mib ") == 1.5 * 2**20 and parse_bytes(3e9) == 3e9
    for bad in ("5 parsecs", "GB", "-1GB", "0", ""):
        with pytest.raises(ValueError, match="--max-shard-size "):
            parse_bytes(bad, "--max-shard-size")
    assert plan_shards([("a", 4), ("b", 4), ("c", 9), ("d", 1)], 8) == [["a", "b"], ["c"], ["d"]]


def test_single_file_hf_checkpoint_is_read(tmp_path: Path):
    hf = write_official(tmp_path / "hf")
    tensors = _read_all(hf)
    for p in hf.glob("model-*.safetensors"):
        p.unlink()
    (hf / "model.safetensors.index.json").unlink()
    save_file(tensors, str(hf / "model.safetensors"))
    assert is_hf_directory(hf)
    with safe_open(str(hf / "model.safetensors"), framework="pt") as f:
        assert len(list(f.keys())) == len(_official_keys(HF_CONFIG))
    model, _ = load_model(hf)
    assert torch.equal(model.layers[2].mlp.experts.down_proj[0].detach(),
                       tensors["model.layers.2.mlp.experts.0.down_proj.weight"])


def test_inference_loading_accepts_an_hf_directory(hf_dir: Path):
    from deepseekmoe.inference.loading import load_for_inference

    model, tokenizer, path = load_for_inference(hf_dir, device="cpu")
    assert path == hf_dir and tokenizer.encode("w3").ids == [3]
    assert model.config.num_hidden_layers == 3
