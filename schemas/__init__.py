"""The contract shared by producers, streams and exporter: events, state, metric catalogue, config."""

__version__ = "0.1.0"  # the package's one version: pyproject.toml reads it (tool.setuptools.dynamic)
