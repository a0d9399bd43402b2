"""Side-by-side benchmarks (benchmarks/README.md): each module runs as a script, `python benchmarks/NAME.py`, and
the ones `deepseekmoe bench` runs are imported from here by name (deepseekmoe/commands/bench.py)."""
