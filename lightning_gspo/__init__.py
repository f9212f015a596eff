"""lightning-gspo: GSPO and GRPO fine-tuning of language models with PyTorch Lightning."""

__version__ = "0.1.0"
