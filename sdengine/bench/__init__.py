"""The benchmark harness behind `sdengine bench` (see benchmarks/README.md).

flops      analytic FLOP and parameter counts per architecture and resolution
reference  diffusers pipelines with random weights built from sdengine configs
runners    what is timed, per backend (diffusers anchors, sdengine backends)
measure    timing (CUDA events / perf_counter), memory, peak rate, environment
harness    one run: every backend on one workload, into one record
schema     the record's JSON schema (benchmarks/schema.json) and its validation
output     the record's JSON, markdown table and PNG chart
report     the README's performance section from committed records
cli        the `bench` subcommand
"""
