"""The model: where it comes from (source), what it is (spec), and text to vectors (tokenize, embed)."""
