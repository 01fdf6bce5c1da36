"""Point clouds: io (being written)."""
