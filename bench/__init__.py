"""edgefleet benchmarks: each measures edgefleet and its baseline side by side in one run.

Run them all and write ``BENCHMARKS.md``::

    python -m bench.run_all            # full sizes (a few minutes on 2 cores)
    python -m bench.run_all --smoke    # tiny sizes, for CI (figures are not meaningful)

Benchmarks print figures; they never assert wall-clock times.
"""
