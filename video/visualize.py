"""Video: visualize (being written)."""
