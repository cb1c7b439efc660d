"""Catalog sources, validation, environmental noise, splits, query sets and judgments."""
