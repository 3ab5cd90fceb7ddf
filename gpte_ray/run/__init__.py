"""One index run as its steps (pipeline.py), the Ray Data stages, resume state and the copy pass."""
