"""The benchmark harness: the proxy beside the alternatives a user would pick, in one run.

`python -m bench.run` (or `make bench`) starts every peer as its own process on 127.0.0.1, drives
each scenario with wrk or a Python load generator, and writes `bench/results/latest.{md,json,png}`.
"""
