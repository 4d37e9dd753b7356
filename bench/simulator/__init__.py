"""Agent simulator: many mTLS agents against the edge, with live and final measurements.

Run ``python -m bench.simulator --help``. The logic (event building, command
handling, retry decisions, statistics) lives in plain modules with no I/O so it
can be tested without a network; ``agent``, ``transport`` and ``runner`` are the
thin I/O around it.
"""
