"""Benchmarks (never part of the tests' pass/fail). `python -m bench` runs them all and prints JSON
plus a table; each `python -m bench.<name>` runs one alone. Compare ratios measured in one run:
absolute times on a shared 2-core CPU are noisy. See bench/RESULTS.md."""
