"""Benchmarks and soak runs of parall_bridge (``make bench``, ``make soak``)."""
