"""Fuzzing: atheris harnesses (one file each), their seed corpora (corpus/) and the oracles they share with the
hypothesis properties in tests/unit/test_fuzz_*.py (oracles.py). See fuzz.mk for how to run them."""
