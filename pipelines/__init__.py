"""Prefect flows over the pipeline's stages (manual runs, scheduled deployments, sweeps)."""
