"""fnprune: structured pruning of LLMs by preserving functional networks (arXiv 2508.05239)."""

from .modeling import load_pruned

__all__ = ["load_pruned"]
__version__ = "0.1.0"
