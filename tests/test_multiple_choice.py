import json
import re

import pytest
import torch

from deepseekmoe import ModelConfig, Transformer
from deepseekmoe.eval.multiple_choice import (Example, accuracies, encode_pair, load_task, loglikelihoods,
                                              parse_example, score_examples)


def encode(text: str) -> list[int]:
    return [ord(c) % 97 + 2 for c in text]


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1,
                      num_experts_per_tok=2, max_position_embeddings=64, initializer_range=0.2)
    return Transformer(cfg).eval()


def reference_score(model: Transformer, context: str, continuation: str, bos: int) -> float:
    ids = [bos] + encode(context + continuation)
    n = len(encode(continuation))
    logp = model(torch.tensor([ids[:-1]])).logits[0].log_softmax(-1)
    return sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1 - n, len(ids) - 1))


def test_loglikelihood_matches_single_sequence_reference(model):
    reqs = [("The cat", " sat"), ("A much longer context here", " x"), ("Hi", " there friend")]
    got = loglikelihoods(model, encode, reqs, bos_token_id=1, batch_size=2)
    for (ctx, cont), (score, _) in zip(reqs, got):
        assert score == pytest.approx(reference_score(model, ctx, cont, 1), abs=1e-4)


def test_greedy_flag(model):
    ctx = "abc"
    ids = [1] + encode(ctx)
    greedy = []
    for _ in range(3):
        nxt = model(torch.tensor([ids])).logits[0, -1].argmax().item()
        ids.append(nxt)
        greedy.append(nxt)
    # a continuation made of exactly the greedy tokens is flagged greedy; change one token and it is not
    decode = {v: chr(v) for v in range(100)}
    cont_enc = lambda s: [ord(c) for c in s]  # noqa: E731 - identity-like encoder for this case
    cont = "".join(decode[t] for t in greedy)
    ctx_text = "".join(decode[t] for t in [1] + encode(ctx))[1:]
    (score, is_greedy), = loglikelihoods(model, cont_enc, [(ctx_text, cont)], bos_token_id=1)
    assert is_greedy
    other = cont[:-1] + decode[(greedy[-1] + 1) % 100 or 2]
    (_, is_greedy2), = loglikelihoods(model, cont_enc, [(ctx_text, other)], bos_token_id=1)
    assert not is_greedy2


def test_acc_and_acc_norm_by_hand(model, monkeypatch):
    examples = [Example([("q", " a"), ("q", " bbbb")], 1, ["a", "bbbb"]),
                Example([("r", " cc"), ("r", " d")], 0, ["cc", "d"]),
                Example([("s", " é"), ("s", " ab")], 0, ["é", "ab"])]
    table = {" a": -2.0, " bbbb": -4.0, " cc": -3.0, " d": -1.0, " é": -2.0, " ab": -3.0}

    def fake(model_, encode_, reqs, bos, bs):
        return [(table[c], False) for _, c in reqs]

    monkeypatch.setattr("deepseekmoe.eval.multiple_choice.loglikelihoods", fake)
    res = accuracies(score_examples(model, encode, examples))
    # raw sums pick " a" (wrong), " d" (wrong), " é" (right); per character of the choice (no delimiter):
    # -2/1 < -4/4 (right), -3/2 < -1/1 (wrong), -2/1 < -3/2 (wrong); per byte "é" is 2: -2/2 > -3/2 (right)
    assert res == {"acc": 1 / 3, "acc_norm": 1 / 3, "acc_bytes": 2 / 3, "examples": 3}


def word_encode(text: str) -> list[int]:
    """A toy BPE-like tokenizer: a word with its leading space is one token, a lone run of spaces another."""
    return [sum(map(ord, piece)) for piece in re.findall(r" ?\S+|\s+", text)]


def test_encode_pair_moves_trailing_space_and_splits_the_joint_encoding():
    # separately "ab " is [ab, " "] and "c" is [c]; lm-eval encodes "ab" and "ab c" and keeps [" c"]
    assert encode_pair(word_encode, "ab ", "c") == (word_encode("ab"), word_encode(" c"))
    assert encode_pair(word_encode, "ab\n ", " c") == (word_encode("ab"), word_encode("ab\n  c")[1:])
    assert encode_pair(word_encode, "ab", " c") == (word_encode("ab"), word_encode(" c"))
    assert encode_pair(word_encode, "", " c") == ([], word_encode(" c"))


def test_formats(tmp_path):
    items = [
        {"context": "c", "choices": ["x", "y"], "label": 1},
        {"ctx": "c", "endings": ["x", "y", "z"], "label": "2"},
        {"goal": "g", "sol1": "s1", "sol2": "s2", "label": 0},
        {"question": "q", "choices": {"text": ["t1", "t2"], "label": ["A", "B"]}, "answerKey": "B"},
        {"sentence": "Tom gave _ the ball.", "option1": "Ann", "option2": "Bob", "answer": "2"},
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(i) for i in items) + "\n")
    exs = load_task(path)
    assert [e.label for e in exs] == [1, 2, 0, 1, 1]
    assert exs[0].requests == [("c", " x"), ("c", " y")] and exs[0].choices == ["x", "y"]
    assert exs[2].requests == [("Question: g\nAnswer:", " s1"), ("Question: g\nAnswer:", " s2")]
    assert exs[4].requests == [("Tom gave Ann", " the ball."), ("Tom gave Bob", " the ball.")]
    assert exs[4].choices == ["Tom gave Ann", "Tom gave Bob"]  # lm-eval normalises WinoGrande by the contexts
    assert load_task(path, target_delimiter="")[0].requests == [("c", "x"), ("c", "y")]
    with pytest.raises(ValueError, match="unrecognised"):
        parse_example({"foo": 1})
    with pytest.raises(ValueError, match="label 2 is not the index"):
        parse_example({"context": "c", "choices": ["x", "y"], "label": 2})


def test_hellaswag_rows_are_cleaned_like_lm_eval():
    row = {"activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "then he", "ctx": "unused",
           "endings": [" bakes [title] the bread. ", "eats  [step] it"], "label": "1"}
    ex = parse_example(row)
    assert ex.requests == [("Baking: A man mixes flour. Then he", " bakes. the bread."),
                           ("Baking: A man mixes flour. Then he", " eats  it")]
    assert ex.label == 1
    datasets = pytest.importorskip("datasets")
    process_docs = pytest.importorskip("lm_eval.tasks.hellaswag.utils").process_docs
    doc = process_docs(datasets.Dataset.from_list([row]))[0]
    assert ex.requests == [(doc["query"], " " + c) for c in doc["choices"]] and ex.choices == doc["choices"]


def test_eval_task_command_matches_library(tmp_path, capsys):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from deepseekmoe.cli import main
    from deepseekmoe.checkpoint import save_model

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["a cat sat on the mat. the dog ran. " * 30],
                            trainers.BpeTrainer(vocab_size=280, special_tokens=["<|bos|>", "<|eos|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1,
                      num_experts_per_tok=2, max_position_embeddings=64, initializer_range=0.3, bos_token_id=0)
    model = Transformer(cfg).eval()
    save_model(model, tmp_path / "ckpt", tmp_path / "tokenizer.json")
    items = [{"context": "the cat", "choices": ["sat", "ran", "dog"], "label": i % 3} for i in range(4)]
    items += [{"goal": "a dog", "sol1": "ran.", "sol2": "sat on", "label": 1}]
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps(i) for i in items))
    assert main(["eval", str(tmp_path / "ckpt"), "--task", str(task), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    encode = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    want = accuracies(score_examples(model, encode, load_task(task), bos_token_id=0))
    assert got["acc"] == want["acc"] and got["acc_norm"] == want["acc_norm"] and got["examples"] == 5
    assert main(["eval", str(tmp_path / "ckpt"), "--task", str(tmp_path / "none.jsonl")]) == 2
