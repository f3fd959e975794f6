"""declens: decision-centric analysis of layer pruning in large language models.

Quick start::

    import declens
    lm = declens.load_model("smollm2-135m")            # or an HF directory, a .gguf file, a hub id
    data = declens.load_task("arc_easy", limit=200)
    res = declens.analyze(lm, data, fmt="cloze")
    print(res.metrics.transition_layer, res.metrics.dm)
"""

from ._version import __version__  # noqa: F401 (re-exported)

from .analyses.decision import AnalyzeConfig, analyze, prepare
from .analyses.recovery import RecoveryStudyConfig
from .errors import DeclensError
from .execution import ExecutionOptions
from .lens import Lens
from .metrics import LayerMetrics, compute_metrics, transition_point
from .models import LoadedModel, decoder_parts, load_model
from .pruning import PruneConfig
from .results import AnalysisResult, find_runs, load_result
from .results import set_figure_drawers as _set_figure_drawers
from .results import set_result_importer as _set_result_importer
from .runconfig import RunConfig, load_run_config
from .scoring import LayerScores
from .surgery import DenseIds, Positions, dense_layer_ids, keep_positions, layer_view, positions_of, remove_layers
from .tasks import Item, TaskData, TaskSpec, load_task


def _figure_drawer(kind: str):
    """The figure drawer of a result kind, from :data:`declens.plots.FIGURES` (matplotlib is imported at the
    first figure drawn), or its page renderer from :data:`declens.report.PAGES`. Installed below, so compute
    code asks for figures and pages by kind and never imports the presentation layer."""
    from .report import PAGES

    if kind in PAGES:
        return PAGES[kind]
    from .plots import FIGURES

    return FIGURES[kind]


_set_figure_drawers(_figure_drawer)


def _import_result_kinds() -> None:
    """Import every module that registers a result kind (:func:`declens.results.register_result`); installed
    below, so :func:`load_result` knows every kind without the results layer importing the analyses."""
    from .analyses import ablation, cka, compare, correlation, evaluate, findings, noise, recovery, study  # noqa: F401
    from .pruning import run  # noqa: F401


_set_result_importer(_import_result_kinds)

__all__ = [
    "AnalysisResult", "DeclensError", "find_runs", "load_result", "Item", "LayerMetrics", "LayerScores", "Lens", "LoadedModel",
    "TaskData", "TaskSpec", "analyze", "compute_metrics", "decoder_parts", "layer_view", "load_model",
    "load_task", "prepare", "remove_layers", "transition_point",
    "DenseIds", "Positions", "dense_layer_ids", "keep_positions", "positions_of", "ExecutionOptions",
    "RunConfig", "load_run_config",
    "AnalyzeConfig", "PruneConfig", "RecoveryStudyConfig",
]
