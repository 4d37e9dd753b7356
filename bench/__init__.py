"""Benchmarks: ``python -m bench [--only SECTION]`` (``make bench``)."""
