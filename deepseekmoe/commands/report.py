"""`deepseekmoe report`: one self-contained HTML page for a run or a compare directory."""

from __future__ import annotations

import sys
from pathlib import Path

from ..analysis.report import build_report
from ..fileio import check_output_file, write_text_atomically


def report_command(directory: str, *, out: str | None = None) -> int:
    """Write one self-contained HTML page (loss curves, expert-load heatmaps, compare table, routing analysis).

    Args:
        directory: a run directory (metrics.jsonl) or a compare output directory (results.json).
        out: the HTML file to write (default: DIRECTORY/report.html).
    """
    src = Path(directory)
    if not src.is_dir():
        raise FileNotFoundError(f"no such directory: {src}")
    dest = check_output_file(out if out else src / "report.html")
    page = build_report(src)
    write_text_atomically(dest, page)
    print(f"wrote {dest} ({len(page) / 1e6:.1f} MB)", file=sys.stderr)
    return 0
