"""The real-LM chain on SmolLM2-135M, run in order by `python -m benchmarks.smollm2`
(__main__.py)."""
