"""Config templates and the thin model.py adapters of the served models (package data)."""
