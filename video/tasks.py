"""Video: tasks (being written)."""
