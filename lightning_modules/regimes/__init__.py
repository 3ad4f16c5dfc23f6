"""Training regimes. Each file is one concept (e.g. `adversarial.py` for FGM, PGD, FreeLB)."""
from lightning_modules.regimes.adversarial import FGM, PGD, FreeLB
from lightning_modules.regimes.contrastive import SetFit, SupCon
from lightning_modules.regimes.distillation import Distillation
from lightning_modules.regimes.parameter_efficient import BitFit, Freeze, Peft

__all__ = ["FGM", "PGD", "BitFit", "Distillation", "FreeLB", "Freeze", "Peft", "SetFit", "SupCon"]
