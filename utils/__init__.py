"""Strategy, checkpoints, images, metrics and CLI plumbing shared by the entry points."""
