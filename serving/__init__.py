"""Serving: the FastAPI search service and page (app.py) and online A/B bucketing + event log (ab.py)."""
