"""fnprune: structured pruning of LLMs by preserving functional networks (arXiv 2508.05239)."""

__all__ = ["load_pruned"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that the workflow's DAG (which imports fnprune.config and the report modules) never
    # imports torch: the Snakefile is parsed for every dry run and every cluster job.
    if name == "load_pruned":
        from .modeling import load_pruned

        return load_pruned
    raise AttributeError(f"module 'fnprune' has no attribute {name!r}")
