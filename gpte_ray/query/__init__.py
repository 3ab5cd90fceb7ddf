"""Search and evaluation over a table: the query model, ranking, metrics, BEIR files."""
