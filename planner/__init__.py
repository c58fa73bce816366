"""planner: budget-driven compression planning for causal language models."""

__version__ = "0.1.0"
