"""Training-loop helpers (FLOP accounting for the log)."""
