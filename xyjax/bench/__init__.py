"""Benchmark workloads (seeded synthetic request sets, metrics) and the naive padded-batch baseline."""

from xyjax.bench.naive import NaiveGenerator
from xyjax.bench.workload import WORKLOADS, BenchRequest, Workload, make_requests, summarize

__all__ = ["BenchRequest", "NaiveGenerator", "WORKLOADS", "Workload", "make_requests", "summarize"]
