"""A lean decoder loop for Llama-family layers (Llama, Mistral, Qwen2, Qwen3).

The generic path calls the model's own decoder forward and reads layers through hooks. This path
runs the same computation with the layer's own weights, written for throughput on large batches:
one fused ``F.rms_norm`` kernel per norm instead of six elementwise ones, the causal flash kernel of
SDPA with grouped-query attention (no repeated key/value tensors), probes called directly (no hooks),
and optionally the per-layer function compiled with ``torch.compile`` (elementwise work fused).

It is used automatically where it applies (:func:`supported`) and is switched by the model's execution
options (``ExecutionOptions.fastpath``: ``auto``, ``off`` or ``compile``; the ``--fastpath`` option of
the command line); tests check it against the model's own forward.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def mode(parts) -> str:
    """The model's fast-path mode: ``auto`` (default: on where supported), ``off`` or ``compile``."""
    options = getattr(parts, "options", None)
    return options.fastpath if options is not None else "auto"


def supported(parts, seq_len: int) -> bool:
    """Whether the lean loop runs (not switched off) and reproduces this model's forward for rows of ``seq_len`` tokens."""
    if mode(parts) == "off":
        return False
    model = parts.model
    cfg = parts.config
    if getattr(cfg, "model_type", None) not in FAMILIES or getattr(model, "hf_device_map", None):
        return False
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    window = getattr(cfg, "sliding_window", None)
    if window and seq_len > window and (getattr(cfg, "use_sliding_window", True) or cfg.model_type == "mistral"):
        return False
    if not hasattr(parts.decoder, "rotary_emb"):
        return False
    layer = parts.layers[0]
    need = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
    return all(hasattr(layer, n) for n in need) and all(
        hasattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling"))


def _rms(x: Tensor, norm) -> Tensor:
    """The model's RMSNorm (normalise in float32, cast back, then scale) as one fused kernel + a multiply."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    return norm.weight * F.rms_norm(x, (x.shape[-1],), None, eps)  # float32 inside, rounded once to x's dtype


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    h = x.shape[-1] // 2
    rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return x * cos + rot * sin


def layer_forward(layer, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None) -> Tensor:
    """One decoder layer: ``[B, T, d]`` -> ``[B, T, d]`` (cos/sin ``[B, 1, T, hd]``; mask ``[B, 1, T, T]`` bool or None = causal)."""
    attn = layer.self_attn
    B, T, _ = h.shape
    x = _rms(h, layer.input_layernorm)
    hd = attn.head_dim
    q = attn.q_proj(x).view(B, T, -1, hd)
    k = attn.k_proj(x).view(B, T, -1, hd)
    v = attn.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
    if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm of queries and keys
        q = _rms(q, attn.q_norm)
        k = _rms(k, attn.k_norm)
    q = _rotate(q.transpose(1, 2), cos, sin)
    k = _rotate(k.transpose(1, 2), cos, sin)
    gqa = q.shape[1] != k.shape[1]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=attn.scaling,
                                       enable_gqa=gqa)
    h = h + attn.o_proj(o.transpose(1, 2).reshape(B, T, -1))
    x = _rms(h, layer.post_attention_layernorm)
    mlp = layer.mlp
    return h + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))


def last_position_layer(layer, h: Tensor, cos: Tensor, sin: Tensor, last: Tensor) -> Tensor:
    """The final layer where only the last real position of each (right-padded) row is read.

    Keys and values are computed at every position; queries, attention output, the MLP and the
    residual update only at ``last`` (``[B]`` indices). Returns ``h`` with those positions replaced.
    """
    attn = layer.self_attn
    B, T, _ = h.shape
    rows = torch.arange(B, device=h.device)
    x = _rms(h, layer.input_layernorm)
    hd = attn.head_dim
    k = attn.k_proj(x).view(B, T, -1, hd)
    v = attn.v_proj(x).view(B, T, -1, hd).transpose(1, 2)
    q = attn.q_proj(x[rows, last]).view(B, 1, -1, hd)
    if hasattr(attn, "q_norm"):
        q = _rms(q, attn.q_norm)
        k = _rms(k, attn.k_norm)
    c, s_ = cos[:, :, last].transpose(0, 2), sin[:, :, last].transpose(0, 2)  # [B, 1, 1, hd]
    q = _rotate(q.transpose(1, 2), c, s_)
    k = _rotate(k.transpose(1, 2), cos, sin)
    keys = (torch.arange(T, device=h.device)[None, :] <= last[:, None])[:, None, None, :]  # [B, 1, 1, T]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, scale=attn.scaling, enable_gqa=q.shape[1] != k.shape[1])
    hl = h[rows, last] + attn.o_proj(o.reshape(B, -1))
    mlp = layer.mlp
    x = _rms(hl, layer.post_attention_layernorm)
    hl = hl + mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    out = h.clone()
    out[rows, last] = hl
    return out


_compiled: dict[str, Callable] = {}


def _layer_fn(parts) -> Callable:
    if mode(parts) != "compile":
        return layer_forward
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(layer_forward, dynamic=True)
    return _compiled["fn"]


def run(parts, batch, probes: Sequence, ids: Sequence[int], dense: Sequence[int],
        start_hidden: Tensor | None = None, trim_final: bool = True) -> Tensor:
    """Run the layers at positions ``ids`` over ``batch``, calling ``probes`` after each; return the
    final normalised hidden states (what the LM head reads). With ``trim_final``, when every probe
    declares ``last_position_only`` (see :class:`declens.runner.Probe`), the final layer computes only
    each row's last position; ``trim_final=False`` computes every position (rounds like a full pass)."""
    dec = parts.decoder
    T = batch.input_ids.shape[1]
    h = dec.embed_tokens(batch.input_ids) if start_hidden is None else start_hidden
    pos = batch.position_ids
    if pos is None:
        pos = torch.arange(T, device=h.device)[None]
    cos, sin = dec.rotary_emb(h, pos)
    cos, sin = cos[:, None].to(h.dtype), sin[:, None].to(h.dtype)
    mask = batch.mask4d
    fn = _layer_fn(parts)
    # every probe reads only each row's last position (the letter format's decision token): the
    # final layer then computes nothing else
    trim = trim_final and bool(probes) and mask is None and all(getattr(p, "last_position_only", False) for p in probes)
    for p in probes:
        p.start(batch)
    for pos_i, idx in enumerate(ids):
        layer = parts.layers[idx]
        if trim and pos_i == len(ids) - 1:
            out = last_position_layer(layer, h, cos, sin, batch.lengths - 1)
        else:
            out = fn(layer, h, cos, sin, mask)
        for p in probes:
            new = p.layer(pos_i, dense[idx], h, out)
            if new is not None:
                out = new
        h = out
    for p in probes:
        p.finish(batch)
    return parts.norm(h)

