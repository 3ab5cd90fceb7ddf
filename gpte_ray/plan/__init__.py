"""Planning a run: what it embeds, copies, deletes and quarantines, decided on the cluster.

- `diff`: the scan against the table, classified over Arrow; `Diff` (the run's counts and its
  plan folder), the mass-delete guard.
- `files`: the plan folder's layout, and the writing and reading of its Parquet files.
- `grouping`: grouping rows by a key, in one Ray task when few, else by a hash shuffle.
- `kept`: the kept source columns' one type across shards.
"""
