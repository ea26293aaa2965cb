"""Offline, seeded long-context task samples and scoring for the demo and the benchmark."""
