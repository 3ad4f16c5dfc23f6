"""finetune-lab: fine-tune pretrained transformers on NLP tasks under composable training regimes."""
__version__ = "0.1.0"
