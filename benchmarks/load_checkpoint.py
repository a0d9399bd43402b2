"""Loading one of our float checkpoints: peak memory and time, the way `load_checkpoint` does it against copying.

    python benchmarks/load_checkpoint.py make /tmp/ckpt --preset small-deepseekmoe   # a random fp32 checkpoint
    python benchmarks/load_checkpoint.py run /tmp/ckpt --rounds 3                  # both ways, alternating

`mapped` is `checkpoint.load_checkpoint`: the model is built on the meta device and the tensors read from
model.safetensors (views of the mapped file) become its parameters. `copied` is the baseline: the model is
allocated and initialised, and the read tensors are copied into it. Each load runs in a fresh process (peak RSS
only grows), the two ways alternating; each reports the load time, the peak RSS after loading and after one
forward pass over 64 tokens (which reads every weight), and that RSS split into anonymous memory and file pages.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WAYS = ("copied", "mapped")


def load_copied(path: Path):
    """The baseline: allocate and initialise the model, then copy the read tensors into it."""
    from deepseekmoe.checkpoint import find_checkpoint, read_safetensors
    from deepseekmoe.config import ModelConfig
    from deepseekmoe.filenames import CONFIG_FILE, MODEL_FILE
    from deepseekmoe.model import Transformer

    ckpt = find_checkpoint(path)
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_dict(json.loads((ckpt / CONFIG_FILE).read_text())))
    model.to_empty(device="cpu")
    model.init_weights()
    model.load_state_dict(read_safetensors(ckpt / MODEL_FILE), strict=not model.config.tie_word_embeddings)
    return model.eval()


def memory() -> dict[str, float]:
    """Peak RSS and the current anonymous / file-backed RSS, in GB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kb = {k: int(status[k].split()[0]) for k in ("RssAnon", "RssFile")}
    return {"peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
            "anon_gb": round(kb["RssAnon"] / 2**20, 3), "file_gb": round(kb["RssFile"] / 2**20, 3)}


def one(path: Path, way: str) -> dict:
    from deepseekmoe.checkpoint import load_checkpoint

    bare = memory()
    t = time.perf_counter()
    model = load_copied(path) if way == "copied" else load_checkpoint(path)[0]
    seconds = time.perf_counter() - t
    loaded = memory()
    with torch.inference_mode():
        model(torch.arange(64)[None] % model.config.vocab_size)
    return {"way": way, "load_s": round(seconds, 3), "bare": bare, "loaded": loaded, "after_forward": memory()}


def make(path: Path, preset: str) -> None:
    from deepseekmoe.checkpoint import save_model
    from deepseekmoe.model import Transformer
    from deepseekmoe.presets import load_preset

    torch.manual_seed(0)
    save_model(Transformer(load_preset(preset)), path)
    size = (path / "model.safetensors").stat().st_size
    print(json.dumps({"checkpoint": str(path), "preset": preset, "weights_gb": round(size / 1e9, 3)}))


def run(path: Path, rounds: int) -> dict:
    results: dict[str, list[dict]] = {way: [] for way in WAYS}
    before = os.getloadavg()[0]
    for _ in range(rounds):
        for way in WAYS:
            out = subprocess.run([sys.executable, __file__, "one", str(path), way], check=True, capture_output=True,
                                 text=True).stdout
            results[way].append(json.loads(out))
    return {"weights_gb": round((path / "model.safetensors").stat().st_size / 2**30, 3), "results": results,
            "load_average": [round(before, 2), round(os.getloadavg()[0], 2)],
            "machine": f"{os.cpu_count()} cores, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("make", "run", "one"))
    p.add_argument("path", type=Path)
    p.add_argument("way", nargs="?", choices=WAYS)
    p.add_argument("--preset", default="small-deepseekmoe")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.action == "make":
        return make(a.path, a.preset)
    if a.action == "one":
        return print(json.dumps(one(a.path, a.way)))
    report = run(a.path, a.rounds)
    if a.json:
        return print(json.dumps(report))
    print(f"weights {report['weights_gb']} GiB; {report['machine']}; load average {report['load_average']}")
    print("way     load s   bare RSS   peak RSS after load   after forward (anon / file)   GB")
    for way, rows in report["results"].items():
        for r in rows:
            f = r["after_forward"]
            print(f"{way:7} {r['load_s']:7.2f}   {r['bare']['peak_rss_gb']:8.3f}   {r['loaded']['peak_rss_gb']:8.3f}   "
                  f"{f['peak_rss_gb']:8.3f} ({f['anon_gb']:.3f} / {f['file_gb']:.3f})")


if __name__ == "__main__":
    main()
