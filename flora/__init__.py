"""FLoRA: federated fine-tuning of LLMs with heterogeneous LoRA ranks, aggregated exactly by stacking."""

__version__ = "0.1.0"
