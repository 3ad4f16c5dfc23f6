"""finetune-lab: fine-tune pretrained transformers on NLP tasks under composable training regimes."""
import os as _os
import sys as _sys

__version__ = "0.1.0"

# Large CPU tensors (>= 2 MB: activations, logit chunks) on transparent huge pages. glibc's default
# allocator otherwise serves them from a heap that fragments as sequence lengths change from batch to
# batch: Gemma 3 270M + LoRA on SGD peaked at 4.96 GB without this and 3.25 GB with it, at equal speed
# (benchmarks/sgd_assistant.py). PyTorch reads the variable once, at its first allocation, so it is set
# here only when torch is not loaded yet (the `finetune` command imports this package first), and never
# over a value the user chose: THP_MEM_ALLOC_ENABLE=0 turns it off.
if _sys.platform.startswith("linux") and "torch" not in _sys.modules:
    _os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
