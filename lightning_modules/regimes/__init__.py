"""Training regimes. Each file is one concept (e.g. `adversarial.py` for FGM, PGD, FreeLB)."""
from lightning_modules.regimes.parameter_efficient import BitFit, Freeze, Peft

__all__ = ["BitFit", "Freeze", "Peft"]
