"""Throughput benchmarks (to come): tierstream against a raw aiokafka baseline, same run."""
