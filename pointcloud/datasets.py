"""Point clouds: datasets (being written)."""
