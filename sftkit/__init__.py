"""Shared pieces of the fine-tuning scripts: one module per idea (backend, data, prompts, memory, run)."""

__version__ = "0.1.0"
