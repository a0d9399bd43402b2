"""ModelConfig: exact round trips (YAML, JSON, HF config.json), the released 16B config, the paper's notation and
the one-line ValueErrors for invalid values."""

from __future__ import annotations

import json
import re

import pytest

from deepseekmoe import ModelConfig, load_preset, preset_names


@pytest.mark.parametrize("name", preset_names())
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_file_round_trip_is_exact_for_every_preset(tmp_path, name, suffix):
    cfg = load_preset(name)
    path = tmp_path / f"model{suffix}"
    cfg.save(path)
    loaded = ModelConfig.load(path)
    assert loaded == cfg
    assert loaded.to_dict() == cfg.to_dict()
    assert all(type(loaded.to_dict()[k]) is type(v) for k, v in cfg.to_dict().items())


@pytest.mark.parametrize("name", preset_names())
def test_hf_dict_round_trip_is_exact_for_every_preset(name):
    cfg = load_preset(name)
    hf = cfg.to_hf_dict()
    assert hf["model_type"] == "deepseek"
    # through JSON text, as a config.json file would go
    assert ModelConfig.from_hf_dict(json.loads(json.dumps(hf))) == cfg


def test_hf_round_trip_keeps_gqa_and_extras():
    cfg = load_preset("tiny-gshard").replace(num_key_value_heads=2, capacity_factor=1.25, z_loss_alpha=1e-3,
                                            tie_word_embeddings=True)
    hf = cfg.to_hf_dict()
    assert hf["num_key_value_heads"] == 2 and hf["router"] == "gshard" and hf["capacity_factor"] == 1.25
    assert ModelConfig.from_hf_dict(hf) == cfg


def test_hf_config_file_is_recognised_by_load(tmp_path, released_16b_config):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(released_16b_config, indent=2))
    assert ModelConfig.load(path) == load_preset("deepseekmoe-16b")


def test_released_16b_config_parses_to_the_preset(released_16b_config):
    cfg = ModelConfig.from_hf_dict(released_16b_config)
    assert cfg == load_preset("deepseekmoe-16b")
    # remote-code defaults for keys absent from config.json
    assert cfg.aux_loss_alpha == 0.001 and cfg.seq_aux is True
    assert cfg.router == "softmax_topk" and cfg.num_kv_heads == 16
    assert [cfg.is_moe_layer(i) for i in range(3)] == [False, True, True] and cfg.num_moe_layers == 27


def test_preset_to_hf_dict_reproduces_every_released_field(released_16b_config):
    hf = load_preset("deepseekmoe-16b").to_hf_dict()
    for key, value in released_16b_config.items():
        assert key in hf, key
        assert hf[key] == value, key
        if not isinstance(value, (int, float)) or isinstance(value, bool):  # 10000 == 10000.0 is fine
            assert type(hf[key]) is type(value), key
    # the remaining keys are this project's extras, readable back by name
    extra = set(hf) - set(released_16b_config)
    assert extra <= {"aux_loss_alpha", "seq_aux", "router", "device_aux_loss_alpha", "n_device_groups",
                     "z_loss_alpha", "capacity_factor", "hash_seed", "experts_impl"}


def test_from_paper_derives_routed_active_and_width():
    cfg = ModelConfig.from_paper(num_experts=16, granularity=4, top_k=2, num_shared=1, ffn_size=344)
    assert cfg.n_routed_experts == 63
    assert cfg.num_experts_per_tok == 7
    assert cfg.n_shared_experts == 1
    assert cfg.moe_intermediate_size == 86
    # the paper's own 2B model is this recipe
    two_b = load_preset("deepseekmoe-2b")
    assert ModelConfig.from_paper(num_experts=16, granularity=4, top_k=2, num_shared=1, ffn_size=3416,
                                  **{k: v for k, v in two_b.to_dict().items()
                                     if k not in ("n_routed_experts", "num_experts_per_tok", "n_shared_experts",
                                                  "moe_intermediate_size")}) == two_b


def test_from_paper_rejects_indivisible_width():
    with pytest.raises(ValueError, match=r"^ffn_size=343 is invalid: expected a multiple of granularity=4$"):
        ModelConfig.from_paper(num_experts=16, granularity=4, top_k=2, num_shared=1, ffn_size=343)


@pytest.mark.parametrize("overrides, message", [
    (dict(n_routed_experts=8, num_experts_per_tok=9), "num_experts_per_tok=9 exceeds n_routed_experts=8"),
    (dict(router="topk"),
     "router='topk' is invalid: expected one of 'softmax_topk', 'switch', 'gshard', 'hash', 'none'"),
    (dict(router="switch", num_experts_per_tok=2),
     "num_experts_per_tok=2 is invalid: expected 1 for router='switch'"),
    (dict(router="gshard", num_experts_per_tok=1),
     "num_experts_per_tok=1 is invalid: expected 2 for router='gshard'"),
    (dict(hidden_size=130, num_attention_heads=4),
     "hidden_size=130 is invalid: expected a multiple of num_attention_heads=4"),
    (dict(num_key_value_heads=3), "num_key_value_heads=3 is invalid: expected a divisor of num_attention_heads=4"),
    (dict(n_device_groups=3), "n_device_groups=3 is invalid: expected a divisor of n_routed_experts=8"),
    (dict(capacity_factor=0.0), "capacity_factor=0.0 is invalid: expected a number > 0, or None for dropless"),
    (dict(router="none"), "n_routed_experts=8 is invalid: expected None when router='none'"),
    (dict(experts_impl="fast"), "experts_impl='fast' is invalid: expected one of 'loop', 'grouped'"),
    (dict(aux_loss_alpha=-0.1), "aux_loss_alpha=-0.1 is invalid: expected a number >= 0"),
    (dict(vocab_size=0), "vocab_size=0 is invalid: expected an integer >= 1"),
])
def test_invalid_values_name_field_value_and_allowed(make_config, overrides, message):
    with pytest.raises(ValueError) as info:
        make_config(**overrides)
    text = str(info.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_replace_revalidates(make_config):
    with pytest.raises(ValueError, match="num_experts_per_tok=9 exceeds n_routed_experts=8"):
        make_config().replace(num_experts_per_tok=9)


def test_unknown_fields_are_rejected(tmp_path, released_16b_config):
    with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\): hiden_size"):
        ModelConfig.from_dict({"hiden_size": 64})
    with pytest.raises(ValueError, match=r"hidden_act='gelu' is not supported \(expected 'silu'\)"):
        ModelConfig.from_hf_dict({**released_16b_config, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="model_type='llama' is not supported"):
        ModelConfig.from_hf_dict({**released_16b_config, "model_type": "llama"})
    with pytest.raises(ValueError, match="unsupported key"):
        ModelConfig.from_hf_dict({**released_16b_config, "q_lora_rank": 1536})
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "missing.yaml"))):
        ModelConfig.load(tmp_path / "missing.yaml")


def test_yaml_with_model_section_is_read(tmp_path):
    cfg = load_preset("tiny-switch")
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": cfg.to_dict()}))
    assert ModelConfig.load(path) == cfg


def test_derived_properties(make_config):
    cfg = make_config(num_key_value_heads=2, num_hidden_layers=7, first_k_dense_replace=1, moe_layer_freq=2)
    assert cfg.head_dim == 8 and cfg.num_kv_heads == 2
    assert [i for i in range(7) if cfg.is_moe_layer(i)] == [2, 4, 6]
    assert cfg.num_moe_layers == 3
    dense = make_config(router="none", n_routed_experts=None)
    assert not dense.is_moe and dense.num_moe_layers == 0


def test_hand_written_yaml_reads_scientific_notation(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("rms_norm_eps: 1e-5\naux_loss_alpha: 3E-3\nrope_theta: 5e5\nhidden_size: 64\n")
    cfg = ModelConfig.load(path)
    assert (cfg.rms_norm_eps, cfg.aux_loss_alpha, cfg.rope_theta, cfg.hidden_size) == (1e-5, 3e-3, 5e5, 64)


@pytest.mark.parametrize("text, message", [
    ('hidden_size: "64"\n', "hidden_size='64' is invalid: expected an integer"),
    ("seq_aux: 'no'\n", "seq_aux='no' is invalid: expected true or false"),
    ("aux_loss_alpha: high\n", "aux_loss_alpha='high' is invalid: expected a number"),
    ("num_hidden_layers: 2.5\n", "num_hidden_layers=2.5 is invalid: expected an integer"),
    ("hidden_size: [1\n", "not valid YAML"),
])
def test_wrongly_typed_values_are_value_errors(tmp_path, text, message):
    path = tmp_path / "model.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig.load(path)


def test_hf_nulls_for_non_optional_fields_mean_default(released_16b_config):
    cfg = ModelConfig.from_hf_dict({**released_16b_config, "n_shared_experts": None, "num_key_value_heads": None})
    assert cfg.n_shared_experts == 0 and cfg.num_key_value_heads is None


# ------------------------------------------------------------------ one reader and one type check for every config
@pytest.mark.parametrize("text, value", [
    ("1e-3", 1e-3), ("3e-4", 3e-4), (".5", 0.5), ("5E5", 5e5), ("1.0e5", 1e5), (".5e3", 500.0), ("-2E-2", -0.02),
    ("+1e3", 1000.0), ("1.0e-05", 1e-5), ("1_000", 1000), ("1e3x", "1e3x"), ("e3", "e3"),
])
def test_yaml_numbers_read_as_yaml_1_2_floats(tmp_path, text, value):
    """PyYAML alone reads `1e-3` and `1.0e5` as strings (YAML 1.1 wants a dot and a signed exponent)."""
    from deepseekmoe.configio import read_mapping

    path = tmp_path / "c.yaml"
    path.write_text(f"x: {text}\n")
    read = read_mapping(path)["x"]
    assert read == value and type(read) is type(value)


def test_a_model_file_and_a_recipe_model_section_read_alike(tmp_path):
    """Before one reader, a recipe read `1e-5` as a string and converted it, a model file as a float; `max_steps:
    1e3` was the string '1e3' converted to 1000, and it still is 1000."""
    from deepseekmoe.train.config import load_config

    body = "rms_norm_eps: 1e-5\naux_loss_alpha: 3e-4\nrope_theta: 5E5\ninitializer_range: .5e-2\n"
    (tmp_path / "model.yaml").write_text(body)
    (tmp_path / "recipe.yaml").write_text("model:\n" + "".join(f"  {line}\n" for line in body.splitlines())
                                          + "train:\n  lr: 3e-4\n  min_lr_ratio: .5\n  max_steps: 1e3\n")
    model = ModelConfig.load(tmp_path / "model.yaml")
    run = load_config(tmp_path / "recipe.yaml")
    fields = ("rms_norm_eps", "aux_loss_alpha", "rope_theta", "initializer_range")
    assert [getattr(model, f) for f in fields] == [getattr(run.model, f) for f in fields]
    assert (run.model.rms_norm_eps, run.model.aux_loss_alpha, run.model.rope_theta) == (1e-5, 3e-4, 5e5)
    assert run.model.initializer_range == 0.005 and run.train.lr == 3e-4 and run.train.min_lr_ratio == 0.5
    assert run.train.max_steps == 1000 and type(run.train.max_steps) is int


@pytest.mark.parametrize("section, text, message", [
    ("train", 'lr: "1e-3"', "train.lr='1e-3' is invalid: expected a number"),
    ("model", 'hidden_size: "64"', "model.hidden_size='64' is invalid: expected an integer"),
    ("train", "tensorboard: 1", "train.tensorboard=1 is invalid: expected true or false"),
    ("train", "max_steps: 2.5", "train.max_steps=2.5 is invalid: expected an integer"),
    ("train", "step_decay_at: '[0.5]'", "train.step_decay_at='[0.5]' is invalid: expected a list"),
])
def test_a_recipe_file_refuses_wrong_types_as_a_model_file_does(tmp_path, section, text, message):
    from deepseekmoe.train.config import load_config

    path = tmp_path / "recipe.yaml"
    path.write_text(f"{section}:\n  {text}\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(path)


def test_typed_options_layer_between_the_file_and_the_overrides(tmp_path):
    from deepseekmoe.train.config import load_config

    path = tmp_path / "recipe.yaml"
    path.write_text("train:\n  seed: 1\n  lr: 1e-3\n  batch_size: 2\n")
    run = load_config(path, ["train.seed=3"], options={"train.seed": 2, "train.lr": 1, "preset": "tiny-gshard"})
    assert (run.train.seed, run.train.lr, run.train.batch_size, run.preset) == (3, 1.0, 2, "tiny-gshard")
    assert type(run.train.lr) is float and run.model.router == "gshard"
    with pytest.raises(ValueError, match="train.seed='2' is invalid: expected an integer"):
        load_config(options={"train.seed": "2"})
    with pytest.raises(ValueError, match="unknown config key 'train.sed'"):
        load_config(options={"train.sed": 2})
