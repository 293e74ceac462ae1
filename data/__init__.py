"""Pair generation and the on-disk shard format."""
