"""Export a pruned model that plain ``AutoModelForCausalLM.from_pretrained`` loads."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..errors import DeclensError
from ..models import LoadedModel
from ..presets import clear_quantizer
from ..surgery import keep_positions, layer_view, remove_layers


def export_pruned(lm: LoadedModel, remove: Sequence[int], out_dir: str | Path, check: bool = True) -> dict:
    """Remove layers (dense ids) permanently and save model + tokenizer to ``out_dir``.

    The saved config is consistent (``num_hidden_layers``, per-layer lists such as ``layer_types``,
    attention ``layer_idx``) and records the removed dense ids. With ``check``, the saved model is
    reloaded with ``AutoModelForCausalLM.from_pretrained`` and its logits are compared with the
    in-memory layer view of the original model.

    Returns:
        ``{"out_dir", "kept", "removed", "max_abs_logit_diff"}``.

    Note:
        The model object is pruned in place (its layers are dropped); load it again for dense use.
    """
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise DeclensError(f"{str(out)!r} exists and is not empty; choose a new --out folder")
    parts = lm.parts
    keep = keep_positions(parts, remove)
    probe = torch.tensor([lm.tokenizer.encode("The quick brown fox jumps over the lazy dog. Question: why?")])
    probe = probe.to(lm.device)
    with torch.inference_mode(), layer_view(parts, keep):
        ref = lm.model(probe).logits.float().cpu()
    clear_quantizer(lm.model)
    remove_layers(parts, list(remove))
    lm.model.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    info = {"out_dir": str(out), "removed": list(remove), "kept": int(parts.num_layers), "max_abs_logit_diff": None}
    if check:
        back = AutoModelForCausalLM.from_pretrained(out, dtype=lm.dtype).to(lm.device).eval()
        with torch.inference_mode():
            got = back(probe).logits.float().cpu()
        info["max_abs_logit_diff"] = float((got - ref).abs().max())
    return info
