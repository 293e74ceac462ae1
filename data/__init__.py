"""Layer 2, the data: pair generation (pairs), the on-disk shard format (shards) and real images
(datasets). Imports the base layer (utils/*.py) and models/."""
