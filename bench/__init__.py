"""crfs benchmarks (not tests): `python bench/run.py`, see bench/README.md."""
