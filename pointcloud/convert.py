"""Point clouds: convert (being written)."""
