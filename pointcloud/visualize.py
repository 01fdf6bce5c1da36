"""Point clouds: visualize (being written)."""
