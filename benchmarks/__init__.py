"""The benchmark scripts, one folder per stage, all on one harness (benchmarks/harness.py).

Run them from the repository root as modules: `python -m benchmarks.<stage>.<name> --help`;
`python -m benchmarks` lists them. docs/benchmarks.md describes the harness and the layout;
committed results live in benchmarks/results/.
"""
