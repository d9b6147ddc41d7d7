"""Operability: metrics, tracing and the access log, set up in one place (calls.py)."""
