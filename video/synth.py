"""Video: synth (being written)."""
