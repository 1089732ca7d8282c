"""Adaptive compression: per-layer sensitivity and a budget-driven multi-objective search."""
