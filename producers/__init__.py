"""Stage 2: backup and restore workers, and the telemetry they emit."""
