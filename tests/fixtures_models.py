"""Fixtures for tiny offline models (owned by the model-family work)."""
