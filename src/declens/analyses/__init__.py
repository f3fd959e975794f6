"""Analyses built on the decision lens: the layer-wise decision analysis and the mechanism studies."""

from .decision import analyze, prepare, score

__all__ = ["analyze", "prepare", "score"]
