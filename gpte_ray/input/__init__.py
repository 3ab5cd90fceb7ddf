"""Shards: listing and reading them, row checks and hashes, pins, checks before Ray starts."""
