"""transformers integration: tiny random exports loaded through transformers' own API with `import deepseekmoe.hf`.

Every check compares transformers' view with our own model: logits, greedy generation, the saved layout, the
training loss with its balance losses (against deepseekmoe.losses), a LoRA step with Trainer.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

import deepseekmoe.hf  # noqa: F401  (registers model_type "deepseek")
from deepseekmoe import ModelConfig, Transformer
from deepseekmoe.convert.hf import read_hf_state
from deepseekmoe.hf import DeepseekConfig, DeepseekForCausalLM
from deepseekmoe.inference.generate import generate
from deepseekmoe.losses import auxiliary_losses
from hf_helpers import VOCAB, export_tiny, tiny_hf_config

ATOL = RTOL = 1e-5  # float32: the same math in a different order (measured max |diff| ~1e-6)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Transformer, Path]:
    return export_tiny(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def native(exported) -> Transformer:
    return exported[0]


@pytest.fixture(scope="module")
def hf_dir(exported) -> Path:
    return exported[1]


@pytest.fixture(scope="module")
def hf_model(hf_dir: Path) -> DeepseekForCausalLM:
    return AutoModelForCausalLM.from_pretrained(hf_dir).eval()  # offline, no trust_remote_code


def _model_config(config: DeepseekConfig) -> ModelConfig:
    return ModelConfig.from_hf_dict(config.to_diff_dict())  # what config.json gets


@torch.no_grad()
def test_auto_classes_load_and_logits_equal(hf_model, native: Transformer, hf_dir: Path):
    assert type(AutoConfig.from_pretrained(hf_dir)) is DeepseekConfig and type(hf_model) is DeepseekForCausalLM
    assert _model_config(hf_model.config) == native.config
    ids = torch.randint(0, VOCAB, (2, 11))
    torch.testing.assert_close(hf_model(ids).logits, native(ids).logits, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("overrides", [
    dict(router="hash", num_experts_per_tok=1, hash_seed=3, tie_word_embeddings=True),
    dict(capacity_factor=0.5, norm_topk_prob=True, num_key_value_heads=None),
    dict(n_routed_experts=None, router="none", first_k_dense_replace=0),
    dict(router="switch", num_experts_per_tok=1, moe_layer_freq=2, first_k_dense_replace=0, n_shared_experts=0),
])
@torch.no_grad()
def test_every_router_and_layout_gives_our_logits(overrides: dict, tmp_path: Path):
    native, hf_dir = export_tiny(tmp_path, tiny_hf_config(**overrides), max_shard_size=10**9)  # one file
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert _model_config(model.config) == native.config
    ids = torch.randint(0, VOCAB, (3, 13))
    torch.testing.assert_close(model(ids).logits, native(ids).logits, rtol=RTOL, atol=ATOL)


@torch.no_grad()
def test_greedy_generate_equals_ours_with_either_cache(hf_model, native: Transformer):
    a, b = torch.randint(3, VOCAB, (1, 7)), torch.randint(3, VOCAB, (1, 4))
    ours_a = torch.tensor(generate(native, a[0], 6, temperature=0))
    ours_b = torch.tensor(generate(native, b[0], 5, temperature=0))
    for cache in ("dynamic", "static"):
        out = hf_model.generate(a, attention_mask=torch.ones_like(a), max_new_tokens=6, do_sample=False,
                                cache_implementation=cache)
        assert torch.equal(out[0, 7:], ours_a), cache
        batch = torch.cat([torch.cat([a[:, :4], b], dim=1)[:, :7], torch.cat([torch.full((1, 3), 2), b], dim=1)])
        batch[0] = a[0]
        mask = torch.ones_like(batch)
        mask[1, :3] = 0  # left padded
        out = hf_model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                cache_implementation=cache)
        assert torch.equal(out[0, 7:], ours_a[:5]) and torch.equal(out[1, 7:], ours_b), cache


@torch.no_grad()
def test_save_pretrained_writes_what_convert_writes(hf_model, native: Transformer, hf_dir: Path, tmp_path: Path):
    hf_model.save_pretrained(tmp_path / "saved")
    config, state = read_hf_state(tmp_path / "saved")  # our strict reader: every official key, no others
    assert config == native.config
    for key, tensor in native.state_dict().items():
        assert torch.equal(state[key], tensor), key
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    exported = json.loads((hf_dir / "config.json").read_text())
    # one config.json for both routes; each stamps its transformers version (convert: the one the code targets)
    assert saved.pop("transformers_version") == transformers.__version__ and exported.pop("transformers_version")
    assert saved == exported
    for name in ("configuration_deepseek.py", "modeling_deepseek.py"):
        assert (tmp_path / "saved" / name).read_bytes() == (hf_dir / name).read_bytes()
    fresh = DeepseekForCausalLM(hf_model.config)
    fresh.save_pretrained(tmp_path / "fresh")  # a model built in code, not loaded: the same auto_map
    assert json.loads((tmp_path / "fresh" / "config.json").read_text())["auto_map"] == exported["auto_map"]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = torch.randint(0, VOCAB, (1, 9))
    assert torch.equal(again(ids).logits, hf_model(ids).logits)


@pytest.mark.parametrize("extra", [{}, dict(device_aux_loss_alpha=0.02, n_device_groups=3, z_loss_alpha=0.01,
                                            seq_aux=False)])
def test_training_loss_is_cross_entropy_plus_our_balance_losses(extra: dict, tmp_path: Path):
    native, hf_dir = export_tiny(tmp_path, tiny_hf_config(**extra), max_shard_size=10**9)
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    ids = torch.randint(0, VOCAB, (2, 12))
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        eval_out = model.eval()(ids, labels=labels)
        train_out = model.train()(ids, labels=labels)
        ours = native(ids)
    logits = eval_out.logits[:, :-1].reshape(-1, VOCAB)
    ce = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(eval_out.loss, ce)
    expected = sum(auxiliary_losses(ours.router_outputs, native.config, ce))
    assert eval_out.aux_loss is None and train_out.aux_loss > 0
    torch.testing.assert_close(train_out.aux_loss, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(train_out.loss, ce + train_out.aux_loss)


def test_lora_adapter_trains_one_step_with_trainer(hf_dir: Path, tmp_path: Path):
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"))
    named = dict(model.named_parameters())
    adapters = {k: p.detach().clone() for k, p in named.items() if "lora_" in k}
    base = {k: p.detach().clone() for k, p in named.items() if "lora_" not in k}
    assert len(adapters) == 2 * 2 * 3 and all(not named[k].requires_grad for k in base)  # q,v x A,B x layers
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB, (4, 16))]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                             logging_steps=1, disable_tqdm=True)
    result = Trainer(model=model, args=args, train_dataset=data).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    named = dict(model.named_parameters())
    assert all(torch.equal(named[k].detach(), v) for k, v in base.items())
    changed = [k for k, v in adapters.items() if not torch.equal(named[k].detach(), v)]
    assert changed and all("lora_B" in k for k in changed)  # B starts at zero, so only B moves on step one


def test_config_validation_and_defaults():
    with pytest.raises(ValueError, match="num_experts_per_tok=9 exceeds n_routed_experts=8"):
        DeepseekConfig(n_routed_experts=8, num_experts_per_tok=9)
    with pytest.raises(ValueError, match="router='gshard' does not route num_experts_per_tok=3"):
        DeepseekConfig(router="gshard", num_experts_per_tok=3)
    released = _model_config(DeepseekConfig())  # defaults: deepseek-moe-16b (SPEC.md section 7)
    assert (released.n_routed_experts, released.num_experts_per_tok, released.n_shared_experts) == (64, 6, 2)
    assert released.num_moe_layers == 27 and released.aux_loss_alpha == 0.001
    dense = DeepseekConfig(n_routed_experts=None, num_hidden_layers=2)
    assert dense.router == "none" and not _model_config(dense).is_moe


def test_the_config_class_fields_are_written_from_model_config():
    """The remote code holds the field block hf_config.py writes from ModelConfig (16B values as defaults), so
    DeepseekConfig declares ModelConfig's fields and the HF-only keys, nothing else, and its defaults are the
    16B preset's config.json."""
    from deepseekmoe.configio import field_types
    from deepseekmoe.convert.hf_config import HF_ONLY, REMOTE_CONFIG, field_block, written_block
    from deepseekmoe.presets import load_preset

    assert written_block(REMOTE_CONFIG.read_text()) == field_block()
    assert set(vars(DeepseekConfig)["__annotations__"]) == set(field_types(ModelConfig)) | set(HF_ONLY)
    defaults = DeepseekConfig().to_dict()
    expected = load_preset("deepseekmoe-16b").to_hf_dict()
    assert {k: defaults[k] for k in field_types(ModelConfig)} == {k: expected[k] for k in field_types(ModelConfig)}


@torch.no_grad()
def test_the_released_layout_loads_natively_in_bf16(tmp_path: Path):
    """A checkpoint written as deepseek-moe-16b ships (its config.json, per-expert bf16 tensors) loads with the
    registered classes and computes what our loader's model computes."""
    from deepseekmoe.convert.load import load_model
    from test_convert import write_official

    official = write_official(tmp_path / "official")
    model = AutoModelForCausalLM.from_pretrained(official, dtype=torch.bfloat16).eval()
    assert type(model) is DeepseekForCausalLM and model.model.embed_tokens.weight.dtype == torch.bfloat16
    ours, _ = load_model(official)
    ids = torch.randint(0, 32, (2, 9))
    torch.testing.assert_close(model.float()(ids).logits, ours.float()(ids).logits, rtol=RTOL, atol=ATOL)
