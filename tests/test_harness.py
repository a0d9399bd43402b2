"""lm-evaluation-harness adapter: a tiny random checkpoint evaluated through lm-eval's own interfaces on local tasks.

Every value lm-eval reports is checked against an independent computation: plain full forwards for log-likelihoods,
deepseekmoe.eval.multiple_choice for accuracy, deepseekmoe.inference.generate for generations. Nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from conftest import tiny_config  # noqa: E402
from deepseekmoe import Transformer  # noqa: E402
from deepseekmoe.data.tokenizer import train_tokenizer  # noqa: E402
from deepseekmoe.eval.harness import DeepSeekMoELM, cut_at_stop  # noqa: E402
from deepseekmoe.eval.multiple_choice import accuracies, load_task, score_examples  # noqa: E402
from deepseekmoe.inference.generate import encode_prompt, generate  # noqa: E402
from deepseekmoe.checkpoint import save_model  # noqa: E402

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
CORPUS = ["The quick brown fox jumps over the lazy dog.", "A cat sat on the mat and looked at the bird.",
          "Rain fell on the green hills while the river ran to the sea.", "Numbers: 1 2 3 4 5 6 7 8 9 10."] * 20
MC_ITEMS = [("The cat sat on the", ["mat", "dog", "river"]), ("Rain fell on the", ["hills", "cat", "sea"]),
            ("The quick brown", ["fox", "bird", "mat"]), ("A bird looked at", ["the sea", "green", "a dog"]),
            ("Numbers", ["1 2 3", "fox", "rain"]), ("The river ran to", ["the sea", "the cat", "1"])]
GEN_PROMPTS = ["The quick brown fox", "Rain fell on", "A cat", "Numbers:", "The river ran", "Look at the"]
MAX_GEN = 8


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No download can happen: the hub and datasets libraries run offline for this module."""
    import datasets.config
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        for key, value in OFFLINE.items():
            mp.setenv(key, value)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model, tokenizer, checkpoint dir): a random tiny model with a byte-level BPE tokenizer trained here."""
    root = tmp_path_factory.mktemp("harness")
    tok = train_tokenizer(CORPUS, vocab_size=300)
    assert [tok.token_to_id(t) for t in ("<|bos|>", "<|eos|>")] == [0, 1]
    tok.save(str(root / "tokenizer.json"))
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tok.get_vocab_size(), bos_token_id=0, eos_token_id=1,
                                    max_position_embeddings=64)).eval()
    ckpt = save_model(model, root / "ckpt", root / "tokenizer.json")
    return model, tok, ckpt


@pytest.fixture(scope="module")
def lm(setup):
    return DeepSeekMoELM(pretrained=str(setup[2]), batch_size=4, device="cpu")


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def logprobs(model, ids):
    """Row t: log-probabilities of the token after ids[t] (one plain forward over the whole sequence)."""
    with torch.no_grad():
        return model(torch.tensor([ids[:-1]])).logits[0].float().log_softmax(-1)


@lru_cache(maxsize=None)
def reference_loglikelihood(model, tok, context, continuation):
    """(sum of continuation log-probs, is greedy) from one full forward over bos + context + continuation."""
    ctx, cont = encode(tok, context), encode(tok, continuation)
    ids = [0] + ctx + cont
    lp = logprobs(model, ids)[-len(cont):]
    return lp[torch.arange(len(cont)), cont].sum().item(), lp.argmax(-1).tolist() == cont


def reference_rolling(model, ids, bos, window):
    """Each token is predicted once, from the `window` inputs ending just before it (bos first); windows of
    predictions are cut every `window` tokens, as lm-eval documents for LM.loglikelihood_rolling."""
    full = [bos] + ids
    total = 0.0
    for a in range(0, len(ids), window):
        b = min(a + window, len(ids))
        inputs = full[max(0, b - window):b]
        with torch.no_grad():
            lp = model(torch.tensor([inputs])).logits[0].log_softmax(-1)[-(b - a):]
        total += lp[torch.arange(b - a), torch.tensor(ids[a:b])].sum().item()
    return total


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def task_yaml(name: str, data: Path, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"  cache_dir: {data.parent / 'hf-cache'}\ntest_split: test\n{body}")


def stop_string(tok, ids):
    """The clean text of a generated token after the first (no replacement characters), or None: a stop string
    that surely occurs in the generation, so that the text is cut short."""
    for token in ids[1:]:
        piece = tok.decode([token]).strip()
        if piece and "\ufffd" not in piece and piece.isprintable():
            return piece
    return None


def greedy_generations(model, tok):
    """(prompts, full greedy texts, stop strings) for two prompts whose generation holds a usable stop string."""
    found = []
    for prompt in GEN_PROMPTS:
        ids = generate(model, encode_prompt(tok, prompt, 0), MAX_GEN, temperature=0.0, eos_token_id=1)
        stop = stop_string(tok, ids)
        if stop is not None:
            found.append((prompt, tok.decode(ids), stop))
    assert len(found) >= 2, found
    return tuple(zip(*found[:2]))


@pytest.fixture(scope="module")
def tasks(setup, tmp_path_factory):
    """A local multiple-choice task (labels set so acc is exactly 1/2), a generate_until task whose stop strings
    come from the model's own greedy output, and a loglikelihood_rolling task."""
    model, tok, _ = setup
    root = tmp_path_factory.mktemp("tasks")
    mc = []
    for n, (ctx, choices) in enumerate(MC_ITEMS):
        scores = [reference_loglikelihood(model, tok, ctx, " " + c)[0] for c in choices]
        best = max(range(len(choices)), key=scores.__getitem__)
        mc.append({"context": ctx, "choices": choices, "label": best if n % 2 == 0 else (best + 1) % len(choices)})
    mc_path = write_jsonl(root / "mc.jsonl", mc)
    (root / "mc.yaml").write_text(task_yaml("dsm_mc", mc_path, "output_type: multiple_choice\n"
                                            "doc_to_text: '{{context}}'\ndoc_to_choice: choices\n"
                                            "doc_to_target: label\nmetric_list:\n  - metric: acc\n"))
    prompts, full, until = map(list, greedy_generations(model, tok))
    expected = [cut_at_stop(t, until) for t in full]
    assert all(len(e) < len(t) for e, t in zip(expected, full))  # every generation is really cut short
    gen_path = write_jsonl(root / "gen.jsonl", [{"prompt": p, "answer": a}
                                                for p, a in zip(prompts, [expected[0], "no match"])])
    (root / "gen.yaml").write_text(task_yaml("dsm_gen", gen_path, (
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        f"generation_kwargs:\n  until: {json.dumps(until)}\n  max_gen_toks: {MAX_GEN}\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")))
    docs = ["The quick brown fox jumps over the lazy dog and the cat sat on the mat.", "Rain fell."]
    roll_path = write_jsonl(root / "roll.jsonl", [{"text": d} for d in docs])
    (root / "roll.yaml").write_text(task_yaml("dsm_roll", roll_path, (
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: bits_per_byte\n")))
    return {"dir": root, "mc": mc_path, "gen_expected": expected, "until": until, "docs": docs}


@pytest.fixture(scope="module")
def evaluated(lm, tasks):
    manager = TaskManager(include_path=str(tasks["dir"]), include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=["dsm_mc", "dsm_gen", "dsm_roll"], task_manager=manager,
                                   log_samples=True, bootstrap_iters=0)


def test_multiple_choice_acc_equals_our_scorer(setup, evaluated, tasks):
    model, tok, _ = setup
    ours = accuracies(score_examples(model, lambda s: encode(tok, s), load_task(tasks["mc"]), 0, batch_size=3))
    assert ours["acc"] == 0.5
    assert evaluated["results"]["dsm_mc"]["acc,none"] == pytest.approx(ours["acc"])


def test_loglikelihoods_equal_full_forward(setup, evaluated):
    model, tok, _ = setup
    samples = evaluated["samples"]["dsm_mc"]
    assert len(samples) == len(MC_ITEMS)
    for s in samples:
        ctx, choices = MC_ITEMS[s["doc_id"]]
        for (context, continuation), (resp,), choice in zip(s["arguments"], s["resps"], choices):
            assert (context, continuation) == (ctx, " " + choice)
            score, greedy = reference_loglikelihood(model, tok, context, continuation)
            assert resp[0] == pytest.approx(score, abs=1e-4)
            assert resp[1] == greedy


def greedy_case(model, tok):
    """(context, continuation) where the continuation is the model's greedy next token and tokenizes back to it."""
    for ctx in ["The cat", "Rain fell on", "A bird", "The river", "Numbers", "The quick"]:
        ids = encode(tok, ctx)
        nxt = logprobs(model, [0] + ids + [0])[-1].argmax().item()
        cont = tok.decode([nxt])
        if encode(tok, ctx + cont) == ids + [nxt]:
            return ctx, cont
    raise AssertionError("no context whose greedy token survives re-tokenisation")


def test_loglikelihood_greedy_flag_and_empty_context(setup, lm):
    model, tok, _ = setup
    ctx, cont = greedy_case(model, tok)
    reqs = [(ctx, cont), (ctx, cont + cont), ("", "The cat")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)], disable_tqdm=True)
    assert got[0][1] is True
    for (context, continuation), (score, greedy) in zip(reqs, got):
        assert (score, greedy) == pytest.approx(reference_loglikelihood(model, tok, context, continuation), abs=1e-4)


def test_generate_until_equals_greedy_generate_cut_at_stop(evaluated, tasks):
    samples = sorted(evaluated["samples"]["dsm_gen"], key=lambda s: s["doc_id"])
    assert [s["resps"][0][0] for s in samples] == tasks["gen_expected"]
    assert samples[0]["arguments"][0][1]["until"] == tasks["until"]
    assert evaluated["results"]["dsm_gen"]["exact_match,none"] == 0.5


def test_rolling_task_bits_per_byte(setup, evaluated, tasks):
    model, tok, _ = setup
    total_ll = sum(reference_rolling(model, encode(tok, d), 0, 64) for d in tasks["docs"])
    total_bytes = sum(len(d.encode("utf-8")) for d in tasks["docs"])
    assert evaluated["results"]["dsm_roll"]["bits_per_byte,none"] == pytest.approx(
        -total_ll / total_bytes / math.log(2), rel=1e-5)


def test_loglikelihood_rolling_windows(setup):
    model, tok, ckpt = setup
    docs = ["The quick brown fox jumps over the lazy dog. A cat sat on the mat and looked at the bird.",
            "Rain fell.", "Numbers: 1 2 3 4 5 6 7 8 9 10. The river ran to the sea."]
    small = DeepSeekMoELM(pretrained=str(ckpt), batch_size=3, max_length=8)
    for d in docs:
        ids = encode(tok, d)
        windows = small.rolling_windows(d)
        assert sum(n for _, n in windows) == len(ids)  # every token scored exactly once
        assert max(len(w) - 1 for w, _ in windows) <= 8  # no forward longer than max_length
    got = small.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)],
                                      disable_tqdm=True)
    assert len(encode(tok, docs[0])) > 16  # at least three windows
    for d, value in zip(docs, got):
        assert value == pytest.approx(reference_rolling(model, encode(tok, d), 0, 8), abs=1e-4)
    # a document that fits one window is the plain full-forward log-likelihood after bos
    ids = encode(tok, docs[1])
    lp = logprobs(model, [0] + ids)
    assert got[1] == pytest.approx(lp[torch.arange(len(ids)), ids].sum().item(), abs=1e-4)


def test_loglikelihood_left_truncates_to_max_length(setup):
    model, tok, ckpt = setup
    small = DeepSeekMoELM(pretrained=str(ckpt), max_length=8)
    ctx, cont = "The quick brown fox jumps over the lazy dog and the cat", " sat on the mat"
    assert len(encode(tok, ctx)) > 8
    ids = ([0] + encode(tok, ctx) + encode(tok, cont))[-9:]  # the last 8 inputs and the token after them
    n = len(encode(tok, cont))
    lp = logprobs(model, ids)[-n:]
    (score, _), = small.loglikelihood([Instance("loglikelihood", {}, (ctx, cont), 0)], disable_tqdm=True)
    assert score == pytest.approx(lp[torch.arange(n), ids[-n:]].sum().item(), abs=1e-4)


def test_results_keep_request_order_across_batches(setup, lm):
    reqs = [("The", " cat"), ("The quick brown fox jumps over the lazy", " dog"), ("A", " bird sat"),
            ("Rain fell on the green hills while the river ran", " to the sea")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)], disable_tqdm=True)
    for (ctx, cont), (score, _) in zip(reqs, got):
        assert score == pytest.approx(reference_loglikelihood(setup[0], setup[1], ctx, cont)[0], abs=1e-4)


def test_bad_model_args(setup):
    ckpt = str(setup[2])
    with pytest.raises(ValueError, match="batch_size='auto'"):
        DeepSeekMoELM(pretrained=ckpt, batch_size="auto")
    with pytest.raises(ValueError, match="max_length=65 exceeds"):
        DeepSeekMoELM(pretrained=ckpt, max_length=65)
    with pytest.raises(FileNotFoundError):
        DeepSeekMoELM(pretrained=str(Path(ckpt).parent / "missing"))


def test_registered_name_builds_the_model(setup):
    from lm_eval.api.registry import get_model

    assert get_model("deepseekmoe") is DeepSeekMoELM
    device = "cpu" if torch.cuda.is_available() else "cuda:0"  # lm-eval CLI's default device falls back to cpu
    lm = get_model("deepseekmoe").create_from_arg_string(f"pretrained={setup[2]},max_length=32",
                                                         {"batch_size": "2", "device": device})
    assert (lm.batch_size, lm.max_length, str(lm.device)) == (2, 32, "cpu")
    assert get_model("dummy").__name__ == "DummyLM"  # lm-eval's own models are still found


@pytest.mark.slow
def test_launcher_runs_lm_eval_cli(setup, tasks, tmp_path):
    env = {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(tmp_path / "hf"), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "deepseekmoe.eval.harness", "run", "--model", "deepseekmoe",
           "--model_args", f"pretrained={setup[2]}", "--tasks", "dsm_mc", "--include_path", str(tasks["dir"]),
           "--limit", "2", "--batch_size", "4", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert any("dsm_mc" in line and "acc" in line for line in table), proc.stdout
