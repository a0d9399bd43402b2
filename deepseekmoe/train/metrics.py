"""Where training metrics go: RUN_DIR/metrics.jsonl (always), TensorBoard (when importable), and the terminal (a
tqdm bar with ETA on a tty, plain lines otherwise).

metrics.jsonl holds one JSON object per line. Training records (every log step):
    kind "train", step, lr, loss (total), lm_loss, expert_balance_loss, device_balance_loss, z_loss, grad_norm,
    tokens_per_s, mfu, tokens (seen so far), skipped_steps (non-finite so far), and the routing health of the
    logging interval (the steps since the previous train record; a resumed run's first interval starts at the
    step it resumed from), one entry per MoE layer:
    expert_load [the interval's assignment count of every routed expert],
    expert_load_max_over_mean [max / mean of those counts: 1.0 is perfect balance],
    dead_experts [experts that received no token in the interval],
    expert_load_entropy [entropy (nats) of the counts' shares: log(E) is perfect balance, 0 one expert]
    device_load [with expert parallelism or device groups: each device's share of the interval's assignments]
Validation records: kind "val", step, val_loss (nats/token), val_bpb (bits per UTF-8 byte), val_tokens.
Every record also has elapsed_s (seconds since this process started logging).
Losses are the mean over the step's micro-batches.

TensorBoard (RUN_DIR/tensorboard) gets every number of a record as the scalar KIND/KEY, and the routing health per
MoE layer i (the lists' order) as the scalars routing/moe{i}/load_max_over_mean, routing/moe{i}/dead_experts,
routing/moe{i}/load_entropy and the histogram routing/moe{i}/expert_load (one bucket per expert, expert e
spanning [e, e+1), its height the expert's count), all equal to the metrics.jsonl values.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from ..errors import UserValueError
from ..fileio import write_text_atomically
from ..filenames import METRICS_FILE

ROUTING_SCALARS = {"expert_load_max_over_mean": "load_max_over_mean", "dead_experts": "dead_experts",
                   "expert_load_entropy": "load_entropy"}
"""Routing-health lists of a train record -> their TensorBoard names under routing/moe{i}/."""


def routing_health(counts_LE: torch.Tensor) -> dict[str, list]:
    """The routing-health fields of a train record from per-layer expert counts (L, E) of an interval."""
    if counts_LE.numel() == 0:
        return {"expert_load": [], "expert_load_max_over_mean": [], "dead_experts": [], "expert_load_entropy": []}
    counts = counts_LE.double()
    ratio = counts.max(dim=1).values / counts.mean(dim=1).clamp_min(1e-12)
    share = counts / counts.sum(dim=1, keepdim=True).clamp_min(1e-12)
    entropy = -(share * share.clamp_min(1e-300).log()).sum(dim=1)  # 0 * log 0 counts as 0
    return {"expert_load": counts_LE.tolist(), "expert_load_max_over_mean": [round(float(x), 4) for x in ratio],
            "dead_experts": [int(x) for x in (counts_LE == 0).sum(dim=1)],
            "expert_load_entropy": [round(float(x), 4) for x in entropy]}


def truncate_metrics(run_dir: Path, last_step: int) -> None:
    """Drop records after `last_step` (written after the checkpoint a resumed run restarts from), and a partial
    last line (a write cut short by a full disk or a kill); a damaged line before the last one is an error."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines):
                raise UserValueError(f"{path} line {number} is not a JSON record; repair or remove that line") from None
            print(f"warning: {path}: dropped an incomplete last line", file=sys.stderr)
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line)
    write_text_atomically(path, "".join(line + "\n" for line in kept))


def _format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


class MetricsLogger:
    """Append-only metrics sink with a progress display; use as a context manager."""

    def __init__(self, run_dir: Path, max_steps: int, start_step: int, tensorboard: bool = True,
                 stream: TextIO | None = None) -> None:
        self.file = open(run_dir / METRICS_FILE, "a", encoding="utf-8")
        self.stream = stream or sys.stderr
        self.max_steps, self.start_step = max_steps, start_step
        self.started = time.perf_counter()
        self.tb = _tensorboard_writer(run_dir) if tensorboard else None
        self.bar = _progress_bar(max_steps, start_step, self.stream)

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        self.file.close()

    def advance(self, step: int, loss: float) -> None:
        """Called after every step: moves the progress bar."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"loss {loss:.3f}", refresh=False)

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (a dict with "kind" and "step") to every sink."""
        record = {**record, "elapsed_s": round(time.perf_counter() - self.started, 3)}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            self._to_tensorboard(record)
        self.message(self._line(record))

    def _to_tensorboard(self, record: dict[str, Any]) -> None:
        step = record["step"]
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("step", "kind"):
                self.tb.add_scalar(f"{record['kind']}/{key}", value, step)
        for key, name in ROUTING_SCALARS.items():
            for layer, value in enumerate(record.get(key, [])):
                self.tb.add_scalar(f"routing/moe{layer}/{name}", value, step)
        for layer, load in enumerate(record.get("expert_load", [])):
            self.tb.add_histogram_raw(f"routing/moe{layer}/expert_load", min=0, max=len(load), num=sum(load),
                                      sum=float(sum(e * n for e, n in enumerate(load))),
                                      sum_squares=float(sum(e * e * n for e, n in enumerate(load))),
                                      bucket_limits=[float(e + 1) for e in range(len(load))],
                                      bucket_counts=[float(n) for n in load], global_step=step)

    def message(self, text: str) -> None:
        """A line for the person watching (above the bar on a terminal)."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def _line(self, r: dict[str, Any]) -> str:
        if r["kind"] == "val":
            return f"step {r['step']:>6} | val loss {r['val_loss']:.4f} | val bits/byte {r['val_bpb']:.4f}"
        done = r["step"] - self.start_step
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (self.max_steps - r["step"]) if done > 0 else float("nan")
        return (f"step {r['step']:>6}/{self.max_steps} | loss {r['lm_loss']:.4f} | "
                f"bal {r['expert_balance_loss']:.4f} | lr {r['lr']:.2e} | gnorm {r['grad_norm']:.3f} | "
                f"{r['tokens_per_s']:,.0f} tok/s | mfu {r['mfu']:.2%} | ETA {_format_eta(eta)}")


def _progress_bar(total: int, initial: int, stream: TextIO) -> Any:
    if not getattr(stream, "isatty", lambda: False)():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, file=stream, unit="step", dynamic_ncols=True, leave=True)


def _tensorboard_writer(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
