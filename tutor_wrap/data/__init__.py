"""Datasets and prompt formats: one module per dataset format behind the `Format` interface (data/format.py)."""
