"""dreamlab worlds layer."""
