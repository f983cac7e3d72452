"""abmll-tune: Amortized Bayesian Meta-Learning for LoRA (arXiv 2508.14285) on torchtune."""

__version__ = "0.1.0"
