"""Training methods' own computations, free of the trainer (e.g. RSC's feature muting)."""
