"""report: one self-contained HTML page (no external URLs) with the compare table, curves, heatmaps, analysis."""

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from deepseekmoe import ModelConfig, Transformer
from deepseekmoe.analysis import compare
from deepseekmoe.analysis.analyze import analyze_model
from deepseekmoe.analysis.report import build_report
from deepseekmoe.analysis.results import HEADERS, load_history, read_records, write_json
from deepseekmoe.commands.report import report_command

REPO = Path(__file__).resolve().parents[1]


def _write_run(run_dir: Path, steps: int, final: float, experts: int | None, seed: int) -> None:
    run_dir.mkdir(parents=True)
    records = []
    for step in range(1, steps + 1):
        r = {"kind": "train", "step": step, "lm_loss": final + 1.0 / step + 0.01 * seed, "tokens_per_s": 1000.0}
        if experts:
            r["expert_load"] = [[(step * (e + 1) + layer) % 7 for e in range(experts)] for layer in range(2)]
        records.append(r)
    records.append({"kind": "val", "step": steps, "val_loss": final + 0.01 * seed, "val_bpb": final / 3,
                    "val_tokens": 128})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _tiny_model() -> Transformer:
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      max_position_embeddings=32, intermediate_size=64, moe_intermediate_size=16,
                      n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3, initializer_range=0.2)
    return Transformer(cfg).eval()


@pytest.fixture
def compare_dir(tmp_path: Path) -> Path:
    out = tmp_path / "cmp"
    recipe = {"steps": 5, "seeds": 2, "batch_size": 2, "seq_len": 16, "eval_batches": 2, "data": None,
              "scale": "tiny"}
    for preset, final, experts in (("tiny-dense", 4.0, None), ("tiny-gshard", 3.5, 16)):
        for seed in range(2):
            _write_run(compare.run_dir_for(out, preset, seed), 5, final, experts, seed)
    suites = {"custom": (compare.custom_suite(["tiny-dense", "tiny-gshard"]),
                         {"tiny-dense": "tiny-dense", "tiny-gshard": "tiny-gshard"})}
    compare.write_results(out, recipe, suites)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 8, (2, 2, 13), generator=g)  # few ids, so each recurs
    batches = [(t[:, :-1], t[:, 1:]) for t in tokens]
    result = analyze_model(_tiny_model(), batches, decode=lambda i: " x\n" if i == 5 else f"t{i}")
    write_json(out / "analysis" / "analysis.json", {"data": "synthetic", "seq_len": 12, "batches": 2,
                                                    "checkpoints": [{"name": "tiny/step_5", **result}]})
    return out


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.hrefs, self.tables, self.cells = [], [], 0, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tables += tag == "table"
        if "src" in attrs:
            self.srcs.append(attrs["src"])
        if "href" in attrs:
            self.hrefs.append(attrs["href"])

    def handle_data(self, data):
        self.cells.append(data.strip())


def test_compare_report_is_self_contained_and_has_the_table(compare_dir):
    page = build_report(compare_dir)
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/|@import|url\(", page, re.IGNORECASE)
    parsed = _Collector()
    parsed.feed(page)
    assert parsed.hrefs == []
    assert len(parsed.srcs) == 7  # train + val curves, 1 load heatmap (gshard), fig4, fig5, load, co-activation
    for src in parsed.srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for header in HEADERS:
        assert header in parsed.cells
    assert "tiny-gshard" in parsed.cells and "reference" in parsed.cells
    # dense 4.00/4.01 (std 0.00707) vs gshard 3.50/3.51: gap +0.5 far beyond 2 x pooled std
    assert "4.0050 ± 0.0071" in parsed.cells and "+0.5000" in parsed.cells and "yes" in parsed.cells
    assert "Expert load during training" in page and "Routing analysis" in page
    assert "␣x⏎" in page  # whitespace in top tokens is made visible


def test_run_directory_report_and_cli_writes_the_file(compare_dir, tmp_path):
    run_dir = compare.run_dir_for(compare_dir, "tiny-gshard", 0)
    steps, loads = load_history(read_records(run_dir))
    assert steps == [1, 2, 3, 4, 5] and len(loads) == 2 and len(loads[0][0]) == 16
    assert report_command(str(run_dir), out=str(tmp_path / "run.html")) == 0
    page = (tmp_path / "run.html").read_text()
    assert "Loss curves" in page and "Expert load during training" in page and "Comparison" not in page
    with pytest.raises(FileNotFoundError, match="no results.json, metrics.jsonl"):
        build_report(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        report_command(str(tmp_path / "missing"))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(compare_dir, tmp_path):
    report_command(str(compare_dir))
    shot = tmp_path / "shot.png"
    proc = subprocess.run([str(REPO / "scripts" / "check_report_browser.sh"), str(compare_dir / "report.html"),
                           str(shot), "1200,2400"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20000
