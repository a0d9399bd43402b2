"""transformers integration: a tiny random checkpoint in the official HF layout, used through transformers' own API.

The checkpoint is one of our Transformers exported with `deepseekmoe convert --to-hf` (several shards, with an
index and the remote-code auto_map), so every check compares transformers' view with our own model.
"""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import deepseekmoe.hf  # noqa: F401  (registers model_type "deepseek")
from deepseekmoe import ModelConfig, Transformer
from deepseekmoe.convert.hf import read_hf_state
from deepseekmoe.convert.hf_export import convert_to_hf
from deepseekmoe.hf import DeepseekConfig, DeepseekForCausalLM
from deepseekmoe.train.checkpoint import save_model


def _config(**overrides) -> ModelConfig:
    base = dict(vocab_size=40, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=64, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=6,
                n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, initializer_range=0.2,
                bos_token_id=0, eos_token_id=None)
    return ModelConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def native() -> Transformer:
    torch.manual_seed(0)
    return Transformer(_config()).eval()


@pytest.fixture(scope="module")
def hf_dir(native: Transformer, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    tok = Tokenizer(models.WordLevel({"<bos>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, 40)}}, "<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(root / "tokenizer.json"))
    save_model(native, root / "ckpt", tokenizer_path=root / "tokenizer.json")
    convert_to_hf(root / "ckpt", root / "hf", max_shard_size=60_000)
    assert len(set(json.loads((root / "hf" / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    return root / "hf"


@pytest.fixture(scope="module")
def hf_model(hf_dir: Path) -> DeepseekForCausalLM:
    return AutoModelForCausalLM.from_pretrained(hf_dir).eval()  # offline, no trust_remote_code


@torch.no_grad()
def test_auto_classes_load_and_logits_equal(hf_model, native: Transformer, hf_dir: Path):
    assert "auto_map" in json.loads((hf_dir / "config.json").read_text())
    assert type(AutoConfig.from_pretrained(hf_dir)) is DeepseekConfig and type(hf_model) is DeepseekForCausalLM
    assert hf_model.config.to_model_config() == native.config
    ids = torch.randint(0, 40, (2, 11))
    torch.testing.assert_close(hf_model(ids).logits, native(ids).logits, rtol=0, atol=1e-6)


def test_auto_tokenizer_loads_the_exported_tokenizer(hf_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)  # from tokenizer.json + the written tokenizer_config.json
    assert tokenizer("w3 w17 w5")["input_ids"] == [3, 17, 5] and tokenizer.bos_token == "<bos>"
    assert tokenizer.decode([3, 17]) == "w3 w17"


@torch.no_grad()
def test_greedy_generate_equals_our_loop(hf_model, native: Transformer):
    def ours(prompt: torch.Tensor, n: int) -> torch.Tensor:  # no cache: a full forward per token
        for _ in range(n):
            prompt = torch.cat([prompt, native(prompt).logits[:, -1:].argmax(-1)], dim=1)
        return prompt

    a, b = torch.randint(0, 40, (1, 7)), torch.randint(0, 40, (1, 4))
    out = hf_model.generate(a, attention_mask=torch.ones_like(a), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ours(a, 6))  # (without a mask, generate would guess one from pad_token_id)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], dim=1)])  # left padded
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    out = hf_model.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out[0], ours(a, 5)[0]) and torch.equal(out[1, 3:], ours(b, 5)[0])


@torch.no_grad()
def test_save_pretrained_keeps_the_official_layout(hf_model, native: Transformer, tmp_path: Path):
    hf_model.save_pretrained(tmp_path / "saved")
    config, state = read_hf_state(tmp_path / "saved")  # our strict reader: every official key, no others
    assert config == native.config
    for key, tensor in native.state_dict().items():
        assert torch.equal(state[key], tensor), key
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = torch.randint(0, 40, (1, 9))
    assert torch.equal(again(ids).logits, hf_model(ids).logits)


def test_training_loss_is_cross_entropy_plus_balance_loss(hf_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    ids = torch.randint(0, 40, (2, 12))
    labels = ids.clone()
    labels[0, :4] = -100
    with torch.no_grad():
        eval_out = model.eval()(ids, labels=labels)
        train_out = model.train()(ids, labels=labels)
    logits = eval_out.logits[:, :-1].reshape(-1, 40)
    ce = torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(eval_out.loss, ce)
    assert eval_out.aux_loss is None and len(train_out.router_outputs) == 2
    assert train_out.aux_loss > 0 and torch.allclose(train_out.loss, ce + train_out.aux_loss)


def test_lora_adapter_trains_one_step_with_trainer(hf_dir: Path, tmp_path: Path):
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"))
    named = dict(model.named_parameters())
    adapters = {k: p.detach().clone() for k, p in named.items() if "lora_" in k}
    base = {k: p.detach().clone() for k, p in named.items() if "lora_" not in k}
    assert len(adapters) == 2 * 2 * 3 and all(not named[k].requires_grad for k in base)  # q,v x A,B x layers
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 40, (4, 16))]
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
    released = DeepseekConfig().to_model_config()  # defaults: deepseek-moe-16b (SPEC.md section 7)
    assert (released.n_routed_experts, released.num_experts_per_tok, released.n_shared_experts) == (64, 6, 2)
    assert released.num_moe_layers == 27 and released.aux_loss_alpha == 0.001
    dense = DeepseekConfig(n_routed_experts=None, num_hidden_layers=2)
    assert dense.router == "none" and not dense.to_model_config().is_moe
    assert DeepseekConfig.from_model_config(_config()).to_model_config() == _config()
