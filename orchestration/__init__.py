"""Dagster Definitions for the Pailitao-VL lineage (assets, asset checks, resources, jobs)."""
