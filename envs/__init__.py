"""dreamlab envs layer."""
