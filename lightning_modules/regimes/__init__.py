"""Training regimes. Each file is one concept (e.g. `adversarial.py` for FGM, PGD, FreeLB)."""
