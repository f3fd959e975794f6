"""declens: decision-centric analysis of layer pruning in large language models.

Quick start::

    import declens
    lm = declens.load_model("smollm2-135m")            # or an HF directory, a .gguf file, a hub id
    data = declens.load_task("arc_easy", limit=200)
    res = declens.analyze(lm, data, fmt="cloze")
    print(res.metrics.transition_layer, res.metrics.dm)
"""

__version__ = "0.1.0"

from .analyses.decision import analyze, prepare
from .errors import DeclensError
from .lens import Lens
from .metrics import LayerMetrics, compute_metrics, transition_point
from .models import LoadedModel, decoder_parts, load_model
from .results import AnalysisResult
from .scoring import LayerScores
from .surgery import DenseIds, Positions, dense_layer_ids, keep_positions, layer_view, positions_of, remove_layers
from .tasks import Item, TaskData, TaskSpec, load_task

__all__ = [
    "AnalysisResult", "DeclensError", "Item", "LayerMetrics", "LayerScores", "Lens", "LoadedModel",
    "TaskData", "TaskSpec", "analyze", "compute_metrics", "decoder_parts", "layer_view", "load_model",
    "load_task", "prepare", "remove_layers", "transition_point",
    "DenseIds", "Positions", "dense_layer_ids", "keep_positions", "positions_of",
]
