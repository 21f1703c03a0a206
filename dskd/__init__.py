"""dskd: knowledge distillation for Transformer language models on DeepSpeed."""

__version__ = "0.1.0"
