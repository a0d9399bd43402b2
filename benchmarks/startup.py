"""Command-line start-up: this checkout against an earlier git revision, `deepseekmoe --help` and `info`.

    python benchmarks/startup.py --baseline REV [--rounds 5] [--json]

The package at REV is extracted (`git archive`) into a temporary directory. Each round runs every command once
per side, in a fresh interpreter (`python -X importtime -m deepseekmoe ...` run in that side's tree),
alternating sides and rotating the order every round. Reported per command and side: modules imported (all, and
deepseekmoe's), whether torch was, and the median wall time; the ratio is the median of same-round ratios
(this / baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {"--help": ["--help"], "info": ["info", "--preset", "deepseekmoe-16b"]}


def extract(rev: str, into: Path) -> Path:
    """The tree of `rev` (its deepseekmoe package) under `into`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "deepseekmoe"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run_once(tree: Path, argv: list[str]) -> tuple[float, list[str]]:
    """(wall seconds, imported module names) of one `python -X importtime -m deepseekmoe ARGV`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "deepseekmoe", *argv], env=env, cwd=tree,
                          capture_output=True, text=True)  # cwd: `-m` puts it first on sys.path
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"deepseekmoe {' '.join(argv)} failed in {tree}:\n{proc.stderr[-2000:]}")
    modules = [line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    return seconds, modules[1:]  # the first line is the header


def measure(trees: dict[str, Path], rounds: int) -> dict[str, dict[str, dict]]:
    """{command: {side: {"seconds": [...], "modules": [...]}}}."""
    results: dict[str, dict[str, dict]] = {c: {s: {"seconds": []} for s in trees} for c in COMMANDS}
    sides = list(trees)
    for r in range(rounds):
        order = sides[r % 2:] + sides[:r % 2]
        for command, argv in COMMANDS.items():
            for side in order:
                seconds, modules = run_once(trees[side], argv)
                results[command][side]["seconds"].append(seconds)
                results[command][side]["modules"] = modules
    return results


def rows(results: dict[str, dict[str, dict]]) -> list[dict]:
    out = []
    for command, sides in results.items():
        ratios = [a / b for a, b in zip(sides["this"]["seconds"], sides["baseline"]["seconds"])]
        for side, r in sides.items():
            mods = r["modules"]
            out.append({"command": command, "side": side, "modules": len(mods),
                        "deepseekmoe_modules": sum(m.split(".")[0] == "deepseekmoe" for m in mods),
                        "torch": "torch" in mods, "median_s": statistics.median(r["seconds"]),
                        "ratio": statistics.median(ratios) if side == "this" else None})
    return out


def report(table: list[dict]) -> None:
    print("| command | side | modules | deepseekmoe modules | torch | median wall s | this / baseline |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.3f}"
        print(f"| `{r['command']}` | {r['side']} | {r['modules']} | {r['deepseekmoe_modules']} | "
              f"{'yes' if r['torch'] else 'no'} | {r['median_s']:.2f} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object (machine + results)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"this": ROOT, "baseline": extract(args.baseline, Path(tmp))}
        table = rows(measure(trees, args.rounds))
    machine = {"cpus": os.cpu_count(), "load_average": round(os.getloadavg()[0], 1),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "python": sys.version.split()[0]}
    if args.json:
        print(json.dumps({"machine": machine, "results": table}, indent=1))
        return
    report(table)
    print(f"\n{machine['cpus']} CPUs, load average {machine['load_average']}, {machine['date']}")


if __name__ == "__main__":
    main()
