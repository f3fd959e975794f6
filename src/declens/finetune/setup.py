"""Model set-up for fine-tuning: pruned copies, LoRA (peft) or full training, merging, export.

Export goes through the one pruning export (:mod:`declens.pruning.export`): a fine-tuned pruned
model already lacks its removed layers, so it is saved with the export's self-check
(:func:`~declens.pruning.export.save_verified`: reload with plain transformers, compare logits with
the in-memory model, publish the folder only if they agree); the saved config records the removed
dense ids.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..errors import DeclensError
from ..models import LoadedModel, decoder_parts
from ..surgery import ORIGINAL_LAYERS_ATTR, REMOVED_ATTR, check_removal, remove_layers
from .config import FinetuneConfig


def detach_inference_tensors(model: nn.Module) -> None:
    """Replace tensors created under ``torch.inference_mode`` (they cannot enter autograd) by normal clones.

    Parameters and buffers are normally never inference tensors, but a model loaded, copied or
    run (buffers updated in place, e.g. dynamic RoPE) inside inference mode may hold some.
    """
    with torch.inference_mode(False), torch.no_grad():
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and p.is_inference():
                    module._parameters[name] = nn.Parameter(p.clone(), requires_grad=p.requires_grad)
            for name, b in list(module._buffers.items()):
                if b is not None and b.is_inference():
                    module._buffers[name] = b.clone()
            for name, v in list(vars(module).items()):
                if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and v.is_inference():
                    setattr(module, name, v.clone())


def copy_model(lm: LoadedModel) -> LoadedModel:
    """A deep copy of ``lm`` (weights included) that can be trained without touching ``lm``."""
    model = copy.deepcopy(lm.model)
    detach_inference_tensors(model)
    model.eval()
    out = LoadedModel(model=model, tokenizer=lm.tokenizer, spec=lm.spec, source=dict(lm.source))
    out.options = lm.options  # runs the way the original does
    return out


def pruned_copy(lm: LoadedModel, remove: Sequence[int]) -> LoadedModel:
    """A deep copy of ``lm`` with the layers ``remove`` (dense ids) permanently removed.

    The original model is untouched. The copy's config records the removal (dense numbering), so
    the lens, result files and saved models report dense layer ids.

    Raises:
        LayerSpecError: ids out of range, repeated, already removed, or removing every layer.
    """
    remove = check_removal(lm.parts, remove)  # dense ids, validated against this model
    out = copy_model(lm)
    if remove:
        remove_layers(decoder_parts(out.model), remove)
    out.source = {**lm.source, "pruned_from": lm.spec, "removed": sorted(int(i) for i in remove)}
    return out


def state_copy(lm: LoadedModel, removed: Sequence[int], merges: list[dict] | None = None) -> LoadedModel:
    """A deep copy of ``lm`` in a pruned state: the layers ``removed`` (dense ids) gone and, for a
    layer-merging state (``laco`` / ``mka``: ``PruneRecord.merges``), the hosts' merged weights in place.

    The config records the removal and the merges, so the model exports like any other.
    """
    if not merges:
        return pruned_copy(lm, removed)
    from ..pruning.merging import MergeSpec, apply_merges

    spec = MergeSpec.from_list(merges, list(removed))
    remove = check_removal(lm.parts, spec.removed)
    out = copy_model(lm)
    parts = decoder_parts(out.model)
    apply_merges(parts, spec)
    remove_layers(parts, remove)
    out.source = {**lm.source, "pruned_from": lm.spec, "removed": sorted(int(i) for i in remove), "merges": merges}
    return out


def original_num_layers(lm: LoadedModel) -> int:
    """Layer count of the dense model ``lm`` comes from (itself unless it is a saved pruned model)."""
    return int(getattr(lm.model.config, ORIGINAL_LAYERS_ATTR, None) or lm.num_layers)


def lora_model(model: nn.Module, cfg: FinetuneConfig):
    """Wrap ``model`` with LoRA adapters (``peft``): injected in place, base weights frozen; returns the ``PeftModel``."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise DeclensError("LoRA fine-tuning needs the peft package: pip install 'declens[finetune]' "
                           "(or use --ft-method full)") from None
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=cfg.target_modules, task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft calls transformers' deprecated is_gradient_checkpointing
            return get_peft_model(model, lcfg)
    except ValueError as e:
        raise DeclensError(f"LoRA cannot target {cfg.target_modules!r} on this model ({str(e).splitlines()[0]}); "
                           "use 'all-linear' or names of its linear layers (e.g. q_proj,v_proj)") from None


def merge_lora(peft_model) -> nn.Module:
    """Merge LoRA adapters into the base weights; return the plain transformers model (eval mode)."""
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_modules())


def export_model(lm: LoadedModel, out_dir: str | Path) -> dict:
    """Save a (fine-tuned, pruned) model and its tokenizer so ``AutoModelForCausalLM.from_pretrained`` loads it.

    Checks that the config agrees with the layer count (``num_hidden_layers``, per-layer lists such
    as ``layer_types``, the removed-layer record), then saves with the export self-check
    (:func:`declens.pruning.export.save_verified`).

    Returns:
        ``{"out_dir", "num_layers", "removed" (dense ids), "max_abs_logit_diff", "rel_logit_diff", "tolerance"}``.
    """
    from ..pruning.export import check_export_dir, probe_ids, save_verified

    out = check_export_dir(out_dir)
    if has_lora(lm.model):
        raise DeclensError("the model still holds LoRA layers; merge them (merge_lora) before exporting")
    parts = decoder_parts(lm.model)
    cfg = lm.model.config
    n = parts.num_layers
    problems = []
    if cfg.num_hidden_layers != n:
        problems.append(f"num_hidden_layers={cfg.num_hidden_layers} but {n} layers")
    lt = getattr(cfg, "layer_types", None)
    if lt is not None and len(lt) != n:
        problems.append(f"layer_types has {len(lt)} entries for {n} layers")
    removed = list(getattr(cfg, REMOVED_ATTR, None) or [])
    n0 = getattr(cfg, ORIGINAL_LAYERS_ATTR, None)
    if removed and n0 is not None and n0 - len(removed) != n:
        problems.append(f"{len(removed)} removed of {n0} does not leave {n}")
    if problems:
        raise DeclensError(f"inconsistent pruned config ({'; '.join(problems)}); this is a declens bug, please report it")
    probe = probe_ids(lm)
    with torch.inference_mode():
        ref = lm.model(probe).logits.float().cpu()
    check = save_verified(lm, out, ref, probe)
    return {"out_dir": str(out), "num_layers": n, "removed": removed, "max_abs_logit_diff": check.max_abs_logit_diff,
            "rel_logit_diff": check.rel_logit_diff, "tolerance": check.tolerance}


__all__ = ["state_copy", "copy_model", "detach_inference_tensors", "export_model", "has_lora", "lora_model", "merge_lora",
           "original_num_layers", "pruned_copy"]
