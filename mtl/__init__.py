"""Reproducible multi-task-learning experiments: DVC stages, a typer CLI, Prefect flows and a
compact PyTorch MTL engine (``mtl.engine``, importable without DVC or Prefect)."""

__version__ = "0.1.0"
