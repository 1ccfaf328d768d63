"""llmkern benchmarks: `python -m bench` (see bench/harness.py and DESIGN.md section 8)."""
