"""Evaluation: perplexity by the standard protocol."""

from .perplexity import perplexity

__all__ = ["perplexity"]
