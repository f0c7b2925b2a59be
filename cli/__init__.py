"""The kafka-backup command line: composition root wiring the stages together."""
