"""The Lance table: schema, fragments, the one fenced commit, the lease, staging, indexes and upkeep."""
