"""Point clouds: synth (being written)."""
