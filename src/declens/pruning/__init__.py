"""Layer pruning: Block Influence, Iterative Pruning with SKIP-Prun, baselines, export."""

from .engine import Evaluation, PruningEngine
from .export import export_pruned
from .methods import METHODS, MethodOptions, MethodRun, PruneRecord, SkipPrun, critical_ratio, register_method
from .merging import MergeConfig
from .run import PruneConfig, PruneResult, prune

__all__ = ["METHODS", "Evaluation", "MergeConfig", "MethodOptions", "MethodRun", "PruneConfig", "PruneRecord",
           "PruneResult", "PruningEngine", "SkipPrun", "critical_ratio", "export_pruned", "prune", "register_method"]
