"""Stage 4: serve the aggregator's per-job state as Prometheus metrics, computing nothing but presentation."""
