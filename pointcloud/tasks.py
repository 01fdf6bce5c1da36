"""Point clouds: tasks (being written)."""
