"""`deepseekmoe serve` as a user runs it: start-up mistakes are one line and exit 2 before any model is loaded, and
the README's example works as written on the tiny preset (a real process, curl, the openai client, Ctrl-C)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys


import pytest

from deepseekmoe import Transformer, load_preset
from deepseekmoe.cli import main
from deepseekmoe.data.tokenizer import train_tokenizer
from deepseekmoe.checkpoint import save_model


@pytest.mark.parametrize("args,words", [
    (["--port", "-1"], "--port -1"),
    (["--port", "99999"], "--port 99999"),
    (["--host", "no-such-host.invalid"], "--host no-such-host.invalid"),
    (["--max-tokens", "0"], "--max-tokens 0"),
    (["--request-timeout", "0"], "--request-timeout"),
])
def test_startup_errors_come_before_loading(args, words, capsys, tmp_path):
    assert main(["serve", str(tmp_path / "no-such-run"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deepseekmoe: error: ") and words in err and "\n" not in err


def test_port_in_use(capsys, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(tmp_path / "no-such-run"), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"127.0.0.1:{port}" in err and "already in use" in err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """runs/mine as the README's quick start leaves it: the tiny preset (context 512) with its tokenizer."""
    root = tmp_path_factory.mktemp("runs")
    tok = train_tokenizer(["import os\nimport sys\ndef main():\n    return os.path.join(a, b)\n"] * 50, 300)
    tok.save(str(root / "tokenizer.json"))
    cfg = load_preset("tiny-deepseekmoe").replace(vocab_size=tok.get_vocab_size(), bos_token_id=0, eos_token_id=1)
    save_model(Transformer(cfg).eval(), root / "runs" / "mine" / "checkpoints" / "step_00000001", root / "tokenizer.json")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_readme_serve_example_runs_as_written(tiny_run):
    openai = pytest.importorskip("openai")
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "deepseekmoe", "serve", "runs/mine", "--port", str(port)],
                            cwd=tiny_run, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        body = '{"prompt": "import os", "max_tokens": 32}'
        if shutil.which("curl"):  # at once, as the README runs it: the port listens before the model loads
            out = subprocess.run(["curl", "-s", "--retry", "30", "--retry-connrefused",
                                  f"localhost:{port}/v1/completions", "-d", body],
                                 capture_output=True, text=True, timeout=120).stdout
            reply = json.loads(out)  # sampled at temperature 1: it may end at eos before 32 tokens
            choice, used = reply["choices"][0], reply["usage"]["completion_tokens"]
            assert reply["object"] == "text_completion", out
            assert (choice["finish_reason"], used) == ("length", 32) or (choice["finish_reason"] == "stop"
                                                                         and used <= 32), out
        line = proc.stdout.readline()
        if f"http://127.0.0.1:{port}/v1" not in line:
            proc.wait(timeout=30)
            pytest.fail(f"the server did not start: {line}{proc.stderr.read()}")
        client = openai.OpenAI(base_url=f"http://localhost:{port}/v1", api_key="none")
        reply = client.chat.completions.create(model="runs/mine", max_tokens=8,
                                               messages=[{"role": "user", "content": "Write a haiku."}])
        assert reply.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    err = proc.stderr.read()
    assert code in (0, 130) and "Traceback" not in err, err

