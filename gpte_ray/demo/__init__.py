"""The embedded default: a corpus of installed-package docstrings and a retrieval set built from it."""
