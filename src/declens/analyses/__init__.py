"""Analyses built on the decision lens: the layer-wise decision analysis and the mechanism studies."""

from .decision import AnalyzeConfig, analyze, prepare, score

__all__ = ["AnalyzeConfig", "analyze", "prepare", "score"]
