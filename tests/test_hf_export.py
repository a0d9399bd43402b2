"""An export stands alone: transformers and lm-eval load it with trust_remote_code in a fresh process that cannot
import this package (an import hook refuses it, and the process checks it never appeared in sys.modules).

What that process computes (logits, hidden states, greedy generations with either cache, gradients with and
without checkpointing, tokenizer ids, the chat prompt) is compared here with our own model, tokenizer and
deepseekmoe.data.chat; lm-eval's HF backend on the export is compared with lm-eval through our adapter.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepseekmoe.data.chat import render_chat
from deepseekmoe.inference.generate import encode_prompt, generate
from hf_helpers import VOCAB, export_tiny

ATOL = RTOL = 1e-5  # float32: the same math in a different order (measured max |diff| ~1e-6)
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": "general kenobi"}, {"role": "user", "content": "The cat sat"}]
PROMPT = "The quick brown fox"
# Runs first in every fresh process: any import of this package fails, so the export has to stand alone.
BLOCK_IMPORTS = '''
import sys
class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "deepseekmoe":
            raise ImportError(f"{name} may not be imported here")
sys.meta_path.insert(0, _Refuse())
'''
PROBE = BLOCK_IMPORTS + '''
import json, warnings
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

export, inputs, out = sys.argv[1:4]
data = torch.load(inputs)
config = AutoConfig.from_pretrained(export, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(export, trust_remote_code=True)
ids, prompt = data["ids"], data["prompt"]
result = {"config_class": type(config).__name__, "model_module": type(model).__module__}
with torch.no_grad():
    result["logits"] = model(ids).logits
    result["hidden"] = model(ids, output_hidden_states=True).hidden_states
    for cache in ("dynamic", "static"):
        result[cache] = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                       do_sample=False, cache_implementation=cache)[0, prompt.shape[1]:]
model.train()
grads = []
for checkpointing in (False, True):
    if checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable()
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
result["grad_diff"] = max((grads[0][k] - grads[1][k]).abs().max().item() for k in grads[0])
result["tokens"] = tok(data["text"])["input_ids"]
result["special"] = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.model_max_length]
result["chat_text"] = tok.apply_chat_template(data["messages"], add_generation_prompt=True, tokenize=False)
result["chat_ids"] = list(tok.apply_chat_template(data["messages"], add_generation_prompt=True)["input_ids"])
assert "deepseekmoe" not in sys.modules
torch.save(result, out)
'''


def run_fresh(script: str, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """`script` in a new interpreter, away from the repository, with no way to import this package."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, env={**env, **OFFLINE},
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[y/N]" not in proc.stdout + proc.stderr  # trust_remote_code=True: nothing asks
    return proc


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_tiny(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def probed(exported, tmp_path_factory) -> tuple[dict, dict]:
    root = tmp_path_factory.mktemp("probe")
    inputs = {"ids": torch.randint(0, VOCAB, (2, 11)), "prompt": torch.randint(3, VOCAB, (1, 7)), "text": PROMPT,
              "messages": MESSAGES}
    torch.save(inputs, root / "inputs.pt")
    run_fresh(PROBE, str(exported[1]), str(root / "inputs.pt"), str(root / "out.pt"), cwd=root)
    return inputs, torch.load(root / "out.pt")


def test_the_export_holds_its_code_and_files(exported):
    names = {p.name for p in exported[1].iterdir()}
    assert {"config.json", "configuration_deepseek.py", "modeling_deepseek.py", "tokenizer.json",
            "tokenizer_config.json", "generation_config.json", "model.safetensors.index.json"} <= names
    config = json.loads((exported[1] / "config.json").read_text())
    assert all(f"{v.split('.')[0]}.py" in names for v in config["auto_map"].values())
    assert config["pad_token_id"] == 2
    assert json.loads((exported[1] / "generation_config.json").read_text()) == {
        "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
    for name in ("configuration_deepseek.py", "modeling_deepseek.py"):  # standalone: torch + transformers only
        tree = ast.parse((exported[1] / name).read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and not node.level}
        assert {m.split(".")[0] for m in imported} <= {"__future__", "math", "shutil", "pathlib", "torch",
                                                        "transformers"}, imported


def test_remote_code_gives_our_logits_hidden_states_and_generations(exported, probed):
    native = exported[0]
    inputs, result = probed
    assert result["config_class"] == "DeepseekConfig" and result["model_module"].startswith("transformers_modules")
    with torch.no_grad():
        torch.testing.assert_close(result["logits"], native(inputs["ids"]).logits, rtol=RTOL, atol=ATOL)
    assert len(result["hidden"]) == native.config.num_hidden_layers + 1
    with torch.no_grad():  # the last hidden state is the final norm's output: the LM head gives our logits
        torch.testing.assert_close(native.lm_head(result["hidden"][-1]), native(inputs["ids"]).logits,
                                   rtol=RTOL, atol=ATOL)
    ours = generate(native, inputs["prompt"][0], 6, temperature=0)
    assert result["dynamic"].tolist() == result["static"].tolist() == ours
    assert result["grad_diff"] == 0.0  # gradient checkpointing changes nothing


def test_auto_tokenizer_adds_bos_once_and_declares_pad(exported, probed):
    from tokenizers import Tokenizer

    inputs, result = probed
    tok = Tokenizer.from_file(str(exported[1] / "tokenizer.json"))
    assert result["tokens"] == encode_prompt(tok, PROMPT, 0)  # bos + text, as the CLI, server and harness do
    assert result["special"] == [0, 1, 2, exported[0].config.max_position_embeddings]


def test_chat_template_renders_our_chat_prompt(exported, probed):
    from tokenizers import Tokenizer

    _, result = probed
    expected = render_chat(MESSAGES, bos_token="<|bos|>", eos_token="<|eos|>")
    assert result["chat_text"] == expected
    assert expected.startswith("<|bos|>Be brief.\n\nUser: hello there\n\nAssistant: general kenobi<|eos|>")
    tok = Tokenizer.from_file(str(exported[1] / "tokenizer.json"))
    assert result["chat_ids"] == tok.encode(expected, add_special_tokens=False).ids  # one bos, the template's
    assert result["chat_ids"].count(0) == 1
