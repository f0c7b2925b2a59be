"""The contract shared by producers, streams and exporter: events, state, metric catalogue, config."""
