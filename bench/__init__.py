"""``make bench`` and its helpers (not in the wheel): run as scripts, ``python bench/run.py``."""
