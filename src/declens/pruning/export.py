"""Export a pruned model that plain ``AutoModelForCausalLM.from_pretrained`` loads.

Every export is checked before it is published: the model is written into a temporary sibling
folder, reloaded from there with plain ``AutoModelForCausalLM.from_pretrained`` and its logits on a
probe prompt are compared with the in-memory model's (:func:`compare_logits`). Only when they agree
within the dtype's tolerance (:data:`EXPORT_TOLERANCE`) is the folder renamed into place; on any
failure the temporary folder is removed and nothing is left at ``out_dir``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ..errors import DeclensError, LayerSpecError
from ..models import LOGIT_TOLERANCE, LoadedModel, LogitCheck, compare_logits
from ..presets import clear_quantizer
from ..surgery import check_removal, dense_layer_ids, keep_positions, layer_view, remove_layers, removed_dense_ids

#: The self-check's tolerance per dtype, relative to the logit scale: the rule every comparison of a
#: model's logits uses (:data:`declens.models.LOGIT_TOLERANCE`; the load-time lens check uses it too).
EXPORT_TOLERANCE = LOGIT_TOLERANCE

PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Question: why?"


def probe_ids(lm: LoadedModel) -> Tensor:
    """``[1, T]`` token ids of the self-check's probe prompt, on the model's device."""
    return torch.tensor([lm.tokenizer.encode(PROBE_TEXT)]).to(lm.device)


def check_export_dir(out_dir: str | Path) -> Path:
    """Refuse an output folder that cannot receive an export; return it as a Path.

    Raises:
        DeclensError: ``out_dir`` is a file, or a folder that is not empty.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DeclensError(f"{str(out)!r} is a file; choose a new --out folder")
    if out.is_dir() and any(out.iterdir()):
        raise DeclensError(f"{str(out)!r} exists and is not empty; choose a new --out folder")
    return out


def save_verified(lm: LoadedModel, out_dir: str | Path, ref: Tensor, probe: Tensor,
                  tolerance: float | None = None) -> LogitCheck:
    """Save ``lm`` (model + tokenizer) to ``out_dir`` only if its reload reproduces ``ref``.

    Writes into a temporary sibling folder, reloads it with plain
    ``AutoModelForCausalLM.from_pretrained`` in ``lm.dtype``, compares its logits on ``probe``
    (``[1, T]``) with ``ref`` (``[1, T, V]``, the in-memory model's) and renames the folder into place
    when they agree. On any failure the temporary folder is removed and ``out_dir`` is not created.

    Raises:
        DeclensError: the reloaded model's logits differ beyond the tolerance, or the folder cannot be written.
    """
    from transformers import AutoModelForCausalLM

    out = check_export_dir(out_dir)
    tmp = out.parent / f".{out.name}.declens-tmp-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        clear_quantizer(lm.model)
        lm.model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        back = AutoModelForCausalLM.from_pretrained(tmp, dtype=lm.dtype).to(lm.device).eval()
        with torch.inference_mode():
            got = back(probe).logits.float().cpu()
        del back
        check = compare_logits(ref, got, lm.dtype, tolerance)
        if not check.ok:
            raise DeclensError(
                f"export self-check failed: the reloaded model's logits differ from the in-memory model's by "
                f"{check.max_abs_logit_diff:.3g} ({check.rel_logit_diff:.2g} of the logit scale "
                f"{check.logit_scale:.3g}; tolerance {check.tolerance:.2g} for {str(lm.dtype).replace('torch.', '')}); "
                f"nothing was written to {str(out)!r}; this is a declens bug, please report it")
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except OSError as e:
        raise DeclensError(f"cannot write the export to {str(out)!r} ({e.strerror or e}); choose a writable --out folder") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return check


def export_pruned(lm: LoadedModel, remove: Sequence[int], out_dir: str | Path,
                  tolerance: float | None = None) -> dict[str, Any]:
    """Remove layers (dense ids) permanently and save model + tokenizer to ``out_dir``.

    ``lm`` may be a dense model or a pruned model exported earlier: ``remove`` always holds dense
    ids, validated against the dense layer count and the layers ``lm`` still has. The saved config
    is consistent (``num_hidden_layers``, per-layer lists such as ``layer_types``, attention
    ``layer_idx``) and records the whole removed set in dense ids (earlier removals + ``remove``).
    The export is self-checked (see :func:`save_verified`) against the in-memory layer view.

    Args:
        tolerance: override the dtype's self-check tolerance (see :data:`EXPORT_TOLERANCE`).

    Returns:
        ``{"out_dir", "removed" (this call's ids), "removed_total" (every dense id the saved model
        lacks), "kept" (layer count), "kept_ids" (dense ids), "max_abs_logit_diff", "logit_scale",
        "rel_logit_diff", "tolerance"}``.

    Raises:
        LayerSpecError: bad ids (out of range, repeated, already removed, every layer, none).
        DeclensError: ``out_dir`` unusable, or the self-check failed (nothing is left at ``out_dir``).

    Note:
        The model object is pruned in place (its layers are dropped); load it again for dense use.
    """
    out = check_export_dir(out_dir)
    parts = lm.parts
    remove = check_removal(parts, remove)
    if not remove:
        raise LayerSpecError("nothing to remove; give the dense layer ids to remove, e.g. --remove 24,23")
    keep = keep_positions(parts, remove)
    probe = probe_ids(lm)
    with torch.inference_mode(), layer_view(parts, keep):
        ref = lm.model(probe).logits.float().cpu()
    remove_layers(parts, remove)
    check = save_verified(lm, out, ref, probe, tolerance)
    return {"out_dir": str(out), "removed": list(remove), "removed_total": list(removed_dense_ids(parts)),
            "kept": int(parts.num_layers), "kept_ids": list(dense_layer_ids(parts)),
            **{k: v for k, v in asdict(check).items() if k != "ok"}}
