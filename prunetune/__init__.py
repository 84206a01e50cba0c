"""prunetune: a Ray-distributed search for the Pareto-optimal pruned sub-networks of LLMs."""

__version__ = "0.1.0"
