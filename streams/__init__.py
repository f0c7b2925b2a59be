"""Stage 3: the Faust aggregator folding telemetry into per-job state."""
