"""Point clouds: models (being written)."""
