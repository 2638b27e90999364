"""Training: one DP loop (loop.py) used by both private stages (stages.py)."""
