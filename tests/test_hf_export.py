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
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoTokenizer)

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
base = AutoModel.from_pretrained(export, trust_remote_code=True).eval()
head = AutoModelForSequenceClassification.from_pretrained(export, trust_remote_code=True, num_labels=2).eval()
with torch.no_grad():
    result["base_hidden"] = base(ids).last_hidden_state
    result["head_logits"] = head(ids).logits
result["head_classes"] = [type(base).__name__, type(head).__name__]
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
    assert result["head_classes"] == ["DeepseekModel", "DeepseekForSequenceClassification"]
    torch.testing.assert_close(result["base_hidden"], result["hidden"][-1], rtol=0, atol=0)
    assert result["head_logits"].shape == (2, 2)


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


def test_importing_the_export_gives_our_checkpoint_back(exported, tmp_path: Path):
    """convert --from-hf of an export is our checkpoint again; exporting that writes the same files."""
    from tokenizers import Tokenizer

    from deepseekmoe import cli
    from deepseekmoe.convert.load import load_model

    native, hf_dir = exported
    assert cli.main(["convert", "--from-hf", str(hf_dir), "--out", str(tmp_path / "ours")]) == 0
    back, _ = load_model(tmp_path / "ours", dtype=torch.float32)
    assert back.config == native.config
    for key, tensor in native.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key
    mine, theirs = (Tokenizer.from_file(str(d / "tokenizer.json")) for d in (hf_dir.parent / "ckpt", tmp_path / "ours"))
    text = "The quick brown fox, and a cat."
    assert mine.encode(text, add_special_tokens=False).ids == theirs.encode(text, add_special_tokens=False).ids
    assert cli.main(["convert", "--to-hf", str(tmp_path / "ours"), "--out", str(tmp_path / "again"),
                     "--max-shard-size", "200000"]) == 0
    names = sorted(p.name for p in hf_dir.iterdir())
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == names
    for name in names:
        assert (tmp_path / "again" / name).read_bytes() == (hf_dir / name).read_bytes(), name


MC_ITEMS = [("The cat sat on the", ["mat", "dog", "river"]), ("Rain fell on the", ["hills", "cat", "sea"]),
            ("The quick brown", ["fox", "bird", "mat"]), ("A bird looked at", ["the sea", "green", "a dog"]),
            ("User: hello", ["there", "fox", "rain"]), ("The lazy", ["dog", "the cat", "hills"])]
# lm-eval's own CLI, entered as its `lm_eval` script enters it, in a process that cannot import this package
LM_EVAL_CLI = BLOCK_IMPORTS + '''
from lm_eval.__main__ import cli_evaluate
sys.argv = ["lm_eval", *sys.argv[1:]]
cli_evaluate()
assert "deepseekmoe" not in sys.modules
'''


def _choice_scores(native, tok, context: str, choices: list[str]) -> list[float]:
    """Sum of log p(choice tokens | bos + context) with lm-eval's split (the choice after a space)."""
    ctx = tok.encode(context, add_special_tokens=False).ids
    scores = []
    for choice in choices:
        whole = tok.encode(context + " " + choice, add_special_tokens=False).ids
        ids = torch.tensor([[0, *whole]])
        with torch.no_grad():
            logprobs = native(ids).logits[0, :-1].log_softmax(-1)
        targets = ids[0, 1:]
        scores.append(logprobs[len(ctx):].gather(1, targets[len(ctx):, None]).sum().item())
    return scores


def _mc_task(root: Path, native, tok) -> Path:
    """A local multiple-choice task whose labels are our model's best choice on every other item (acc 1/2)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for n, (context, choices) in enumerate(MC_ITEMS):
        scores = _choice_scores(native, tok, context, choices)
        best = max(range(len(choices)), key=scores.__getitem__)
        rows.append({"context": context, "choices": choices, "label": best if n % 2 == 0 else (best + 1) % 3})
    data = root / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "mc.yaml").write_text(
        f"task: export_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"  cache_dir: {root / 'hf-cache'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return root


def _our_adapter_run(ckpt: Path, tasks: Path) -> tuple[dict, list]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from deepseekmoe.eval.harness import DeepSeekMoELM

    lm = DeepSeekMoELM(pretrained=str(ckpt), batch_size=4, device="cpu")
    out = lm_eval.simple_evaluate(model=lm, tasks=["export_mc"], log_samples=True, bootstrap_iters=0,
                                  task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    return out["results"]["export_mc"], out["samples"]["export_mc"]


@pytest.mark.slow
def test_lm_eval_hf_backend_on_the_export_equals_our_adapter(exported, tmp_path: Path):
    pytest.importorskip("lm_eval")
    from tokenizers import Tokenizer

    native, hf_dir = exported
    tasks = _mc_task(tmp_path / "tasks", native, Tokenizer.from_file(str(hf_dir / "tokenizer.json")))
    ours, our_samples = _our_adapter_run(hf_dir.parent / "ckpt", tasks)
    run_fresh(LM_EVAL_CLI, "run", "--model", "hf", "--model_args", f"pretrained={hf_dir},trust_remote_code=True",
              "--tasks", "export_mc", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "4",
              "--output_path", str(tmp_path / "out"), "--log_samples", cwd=tmp_path,
              timeout=600)
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["export_mc"]
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_export_mc_*.jsonl")).open()]
    assert ours["acc,none"] == 0.5  # the labels make it so: the comparison below is not between two zeros
    assert results["acc,none"] == ours["acc,none"] and results["acc_norm,none"] == ours["acc_norm,none"]
    theirs = {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in samples}
    for sample in our_samples:  # every choice's log-likelihood, not only the argmax
        mine = [float(r[0][0]) for r in sample["resps"]]
        assert theirs[sample["doc_id"]] == pytest.approx(mine, rel=1e-4, abs=1e-4), sample["doc_id"]
