"""Evaluation: retrieval metrics (the paper's I-HR@K / C-HR@K and standard ones), comparisons, reports."""
