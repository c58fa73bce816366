"""Measurements of a candidate model: perplexity, latency, memory, and the corpus they read.

Every evaluator returns a small dataclass that records its protocol and device, so figures taken
under different protocols are never compared. This package never imports `planner`.
"""
