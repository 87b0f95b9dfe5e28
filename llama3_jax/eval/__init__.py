"""Evaluation: needle-in-a-haystack retrieval over context lengths and depths (niah.py; the texts
come from data/haystack.py)."""
