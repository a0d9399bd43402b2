"""`lm_eval --model local-completions` (the real CLI, its remote tokenizer) against a live server scores a local
loglikelihood task exactly as the in-process adapter (deepseekmoe.eval.harness) does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("openai")

from lm_eval.api.instance import Instance  # noqa: E402

from conftest import tiny_config  # noqa: E402
from deepseekmoe import Transformer  # noqa: E402
from deepseekmoe.data.tokenizer import train_tokenizer  # noqa: E402
from deepseekmoe.eval.harness import DeepSeekMoELM  # noqa: E402
from deepseekmoe.inference.engine import Engine  # noqa: E402
from deepseekmoe.inference.server import Settings  # noqa: E402
from deepseekmoe.checkpoint import save_model  # noqa: E402
from live_server import Live  # noqa: E402

CORPUS = ["The quick brown fox jumps over the lazy dog.", "A cat sat on the mat and looked at the bird."] * 30
ITEMS = [("The cat sat on the", ["mat", "dog", "river"]), ("The quick brown", ["fox", "bird", "mat"]),
         ("A bird looked at", ["the sea", "green", "a dog"])]


@pytest.mark.slow
def test_local_completions_agrees_with_the_adapter(tmp_path):
    tok = train_tokenizer(CORPUS, vocab_size=300)
    tok.save(str(tmp_path / "tokenizer.json"))
    torch.manual_seed(0)
    model = Transformer(tiny_config(vocab_size=tok.get_vocab_size(), bos_token_id=0, eos_token_id=1,
                                    max_position_embeddings=64)).eval()
    ckpt = save_model(model, tmp_path / "ckpt", tmp_path / "tokenizer.json")
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"context": c, "choices": ch, "label": 0}) + "\n" for c, ch in ITEMS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mc.yaml").write_text(
        f"task: dsm_srv\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        f"  cache_dir: {tmp_path / 'hf-cache'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: choices\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n")
    live = Live(Engine(model, tok, max_batch_size=4), Settings("tiny", 32))
    try:
        env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_DATASETS_CACHE": str(tmp_path / "hf")}
        cmd = [str(Path(sys.executable).parent / "lm_eval"), "--model", "local-completions", "--model_args",
               f"base_url=http://127.0.0.1:{live.port}/v1/completions,model=tiny,tokenizer_backend=remote,"
               "max_retries=1", "--tasks", "dsm_srv", "--include_path", str(tmp_path / "tasks"),
               "--log_samples", "--output_path", str(tmp_path / "out")]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    finally:
        live.close()
    samples = [json.loads(line) for f in (tmp_path / "out").rglob("samples_dsm_srv_*.jsonl")
               for line in f.read_text().splitlines()]
    served = {(s["arguments"]["gen_args_" + str(i)]["arg_0"], s["arguments"]["gen_args_" + str(i)]["arg_1"]):
              s["resps"][i][0] for s in samples for i in range(len(s["resps"]))}
    assert len(served) == sum(len(ch) for _, ch in ITEMS)
    adapter = DeepSeekMoELM(pretrained=str(ckpt), batch_size=4, device="cpu")
    pairs = list(served)
    local = adapter.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)],
                                  disable_tqdm=True)
    for pair, (score, greedy) in zip(pairs, local):
        assert float(served[pair][0]) == pytest.approx(score, abs=1e-4), pair
        assert str(served[pair][1]) == str(greedy), pair
