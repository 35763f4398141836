"""The collection users search: listing and reading items by key, indexing, backfill and
its policies."""
