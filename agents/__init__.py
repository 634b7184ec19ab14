"""dreamlab agents layer."""
