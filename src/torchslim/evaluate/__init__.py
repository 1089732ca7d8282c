"""Measurements: accuracy, agreement, real bytes on disk, latency."""
