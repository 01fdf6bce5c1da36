"""Point clouds: transforms (being written)."""
