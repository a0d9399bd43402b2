"""`deepseekmoe eval --task` against the real `lm_eval` CLI (run through this project's adapter) on the same items.

The items are chosen so that scoring conventions would disagree: contexts ending in spaces, tabs and newlines, choices
with leading spaces, choices of very different lengths, non-ASCII choices (characters != bytes), an empty target
delimiter. The HellaSwag, PIQA, ARC and WinoGrande tasks are lm-eval's own definitions (their doc_to_* lines and
preprocessing functions) pointed at local files. Both sides must give the same acc, acc_norm and acc_bytes and the
same requests and per-choice log-likelihoods. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from conftest import tiny_config  # noqa: E402
from deepseekmoe import Transformer  # noqa: E402
from deepseekmoe.cli import main  # noqa: E402
from deepseekmoe.data.tokenizer import train_tokenizer  # noqa: E402
from deepseekmoe.eval.multiple_choice import encode_pair, load_task  # noqa: E402
from deepseekmoe.checkpoint import save_model  # noqa: E402

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"
CORPUS = ["The quick brown fox jumps over the lazy dog.", "A cat sat on the mat and looked at the bird.",
          "Rain fell on the green hills while the river ran to the sea.", "Numbers: 1 2 3 4 5 6 7 8 9 10.",
          "Question: where is the café?\nAnswer: über the hills."] * 20
GENERIC = [
    {"context": "The cat sat on the ", "choices": ["mat", "dog", "river"], "label": 0},
    {"context": "Rain fell on the", "choices": [" hills", "  sea", "cat"], "label": 1},
    {"context": "The quick brown", "choices": ["fox", "bird that looked at the green hills while the river ran"],
     "label": 1},
    {"context": "Question: where is the cat?\nAnswer: ", "choices": ["café", "on the mat", "ñ"], "label": 2},
    {"context": "Numbers:\n", "choices": ["1 2 3", "über", "10"], "label": 0},
    {"context": "A bird looked at\t ", "choices": ["the sea", "a dog", " the lazy fox"], "label": 2},
]
NAMED = {
    "hellaswag": [{"activity_label": "Cooking", "ctx_a": "A man mixes flour.", "ctx_b": "then he", "ctx": "",
                   "endings": ["bakes [title] the bread.", "eats  it", "runs to the sea [step] fast", "sits"],
                   "label": "2"},
                  {"activity_label": "Rain", "ctx_a": "Rain fell on the hills.", "ctx_b": "the river",
                   "ctx": "", "endings": ["ran to the sea.", "sat", "jumps over the lazy dog", "café"],
                   "label": "0"}],
    "piqa": [{"goal": "Dry a wet cat", "sol1": "use a towel", "sol2": "put it in the river", "label": 0},
             {"goal": "Count ", "sol1": " 1 2 3", "sol2": "über", "label": 1}],
    "arc_easy": [{"question": "Where does the river run?",
                  "choices": {"text": ["to the sea", "up the green hills", "ñ"], "label": ["A", "B", "C"]},
                  "answerKey": "A"}],
    "winogrande": [{"sentence": "The cat sat on the mat because _ was tired.", "option1": "the cat",
                    "option2": "the mat", "answer": "1"},
                   {"sentence": "The fox jumped over the dog since _ is lazy.", "option1": "the fox",
                    "option2": "the big brown dog", "answer": "2"}],
}
LM_EVAL_YAML = {"hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/utils.py"), "piqa": ("piqa/piqa.yaml", None),
                "arc_easy": ("arc/arc_easy.yaml", None),
                "winogrande": ("winogrande/default.yaml", "winogrande/preprocess_winogrande.py")}
METRICS = "metric_list:\n" + "".join(f"  - metric: {m}\n" for m in ("acc", "acc_norm", "acc_bytes"))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def task_yaml(name: str, data: Path, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"  cache_dir: {data.parent / 'hf-cache'}\ntest_split: test\noutput_type: multiple_choice\n"
            f"{body}{METRICS}")


def lm_eval_definition(name: str, root: Path) -> str:
    """lm-eval's own doc_to_* / process_docs lines for the task, with its helper module linked next to them."""
    yaml_file, helper = LM_EVAL_YAML[name]
    lines = (LM_EVAL_TASKS / yaml_file).read_text().splitlines()
    keep = [line for line in lines if line.startswith(("doc_to_text:", "doc_to_target:", "doc_to_choice:",
                                                        "process_docs:"))]
    body = "\n".join(keep) + "\n"
    if helper is not None:
        module = Path(helper).stem
        (root / f"{name}_{module}.py").symlink_to(LM_EVAL_TASKS / helper)
        body = body.replace(f"!function {module}.", f"!function {name}_{module}.")
    assert "doc_to_choice" in body and "doc_to_text" in body
    return body


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tokenizer, checkpoint dir, task dir, {task name: (jsonl, target delimiter)})."""
    root = tmp_path_factory.mktemp("convention")
    tok = train_tokenizer(CORPUS, vocab_size=300)
    tok.save(str(root / "tokenizer.json"))
    torch.manual_seed(3)
    model = Transformer(tiny_config(vocab_size=tok.get_vocab_size(), bos_token_id=0, eos_token_id=1,
                                    max_position_embeddings=64)).eval()
    ckpt = save_model(model, root / "ckpt", root / "tokenizer.json")
    tasks = root / "tasks"
    tasks.mkdir()
    generic = write_jsonl(tasks / "generic.jsonl", GENERIC)
    body = "doc_to_text: '{{context}}'\ndoc_to_choice: choices\ndoc_to_target: label\n"
    (tasks / "generic.yaml").write_text(task_yaml("dsm_generic", generic, body))
    (tasks / "nodelim.yaml").write_text(task_yaml("dsm_nodelim", generic, body + "target_delimiter: ''\n"))
    files = {"dsm_generic": (generic, " "), "dsm_nodelim": (generic, "")}
    for name, rows in NAMED.items():
        data = write_jsonl(tasks / f"{name}.jsonl", rows)
        (tasks / f"{name}.yaml").write_text(task_yaml(f"dsm_{name}", data, lm_eval_definition(name, tasks)))
        files[f"dsm_{name}"] = (data, " ")
    return tok, ckpt, tasks, files


@pytest.fixture(scope="module")
def lm_eval_run(setup, tmp_path_factory):
    """(results, {task: samples}) of one `lm_eval` CLI run over every task."""
    _, ckpt, tasks, files = setup
    out = tmp_path_factory.mktemp("lm-eval-out")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(out / "hf")}
    cmd = [sys.executable, "-m", "deepseekmoe.eval.harness", "run", "--model", "deepseekmoe",
           "--model_args", f"pretrained={ckpt}", "--tasks", ",".join(files), "--include_path", str(tasks),
           "--batch_size", "4", "--device", "cpu", "--log_samples", "--output_path", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    samples = {}
    for name in files:
        path = next(out.rglob(f"samples_{name}_*.jsonl"))
        samples[name] = sorted(map(json.loads, path.read_text().splitlines()), key=lambda s: s["doc_id"])
    return results, samples


def ours(ckpt: Path, data: Path, delimiter: str, out: Path) -> tuple[dict, list[dict]]:
    """The --json summary and --samples records of `deepseekmoe eval --task`."""
    samples = out / f"{data.stem}-{len(delimiter)}.jsonl"
    argv = ["eval", str(ckpt), "--task", str(data), "--json", "--samples", str(samples), "--batch-size", "3",
            f"--target-delimiter={delimiter}"]
    assert main(argv) == 0
    return samples, [json.loads(line) for line in samples.read_text().splitlines()]


def test_items_exercise_the_conventions(setup):
    """Moving trailing whitespace and splitting the joint encoding changes the tokens of several requests, and the
    per-character and per-byte lengths differ for some choices."""
    tok, _, _, files = setup
    encode = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    requests = [r for data, delim in files.values() for ex in load_task(data, delim) for r in ex.requests]
    naive = sum(encode_pair(encode, c, x) != (encode(c), encode(x)) for c, x in requests)
    assert naive >= 5
    choices = [c for data, delim in files.values() for ex in load_task(data, delim) for c in ex.choices]
    assert any(len(c) != len(c.encode("utf-8")) for c in choices)


@pytest.mark.slow
def test_eval_task_equals_lm_eval_cli(setup, lm_eval_run, tmp_path, capsys):
    _, ckpt, _, files = setup
    results, samples = lm_eval_run
    for name, (data, delimiter) in files.items():
        samples_path, records = ours(ckpt, data, delimiter, tmp_path)
        summary = json.loads(capsys.readouterr().out)
        for metric in ("acc", "acc_norm", "acc_bytes"):
            assert summary[metric] == pytest.approx(results[name][f"{metric},none"]), (name, metric)
        assert len(records) == len(samples[name]) == summary["examples"]
        for mine, theirs in zip(records, samples[name]):
            args = [theirs["arguments"][f"gen_args_{i}"] for i in range(len(theirs["arguments"]))]
            assert mine["arguments"] == [[a["arg_0"], a["arg_1"]] for a in args], name
            their_lls = [float(resp[0][0]) for resp in theirs["resps"]]
            assert mine["loglikelihoods"] == pytest.approx(their_lls, abs=1e-5), name
            assert [mine[m] for m in ("acc", "acc_norm", "acc_bytes")] == [theirs[m] for m in
                                                                          ("acc", "acc_norm", "acc_bytes")]
