"""Throughput of the layer-wise analysis against the lens a user would write with plain transformers.

declens: hooks on the decoder layers, option rows of the LM head only (letter) or the vocabulary only
at continuation positions with shared contexts packed (cloze), length-sorted batches.

peer ("naive lens"): ``model(..., output_hidden_states=True)`` on the same batches, then final norm +
full LM head at the decision position of every layer (letter), or full log-softmax at every position of
every layer over one row per option (cloze); ``hidden_states[-1]`` is used un-normalised-again, i.e. the
known pitfall is avoided so both compute the same numbers.

Both run in the same process on the same rows; the script checks they agree and prints items/s and the
ratio. Example::

    python benchmarks/bench_analyze.py --model smollm2-135m --task arc_challenge --format letter --limit 200
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np
import torch

from declens.analyses.decision import encoder_for, prepare, score
from declens.formats import LetterRequests
from declens.models import load_model
from declens.runner import collate, plan_batches
from declens.scoring import cloze_rows
from declens.tasks import load_task


def naive_letter(lm, req: LetterRequests, max_tokens: int) -> np.ndarray:
    parts = lm.parts
    pad = encoder_for(lm).pad_id
    L = parts.num_layers
    out = np.zeros((L, len(req.prompts), len(req.option_ids)), dtype=np.float32)
    for idx in plan_batches([len(p) for p in req.prompts], max_tokens):
        b = collate(req.prompts, idx, pad, lm.device)
        with torch.inference_mode():
            hs = lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True).hidden_states
            last = b.lengths - 1
            rows = torch.arange(b.size)
            for layer in range(L):
                h = hs[layer + 1][rows, last]
                h = h if layer == L - 1 else parts.norm(h)  # hidden_states[-1] is already normalised
                z = parts.head(h).float()
                if parts.softcap:
                    z = torch.tanh(z / parts.softcap) * parts.softcap
                out[layer, idx] = z[:, req.option_ids].numpy()
    return out


def naive_cloze(lm, req, max_tokens: int) -> np.ndarray:
    parts = lm.parts
    pad = encoder_for(lm).pad_id
    L = parts.num_layers
    rows, reads, owner = cloze_rows(req, pack=False)
    ll = np.zeros((L, len(owner)), dtype=np.float32)
    for idx in plan_batches([len(r) for r in rows], max_tokens):
        b = collate(rows, idx, pad, lm.device)
        with torch.inference_mode():
            hs = lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True).hidden_states
            for layer in range(L):
                h = hs[layer + 1] if layer == L - 1 else parts.norm(hs[layer + 1])
                logp = torch.log_softmax(parts.head(h).float(), -1)  # every position, whole vocabulary
                for bi, r in enumerate(idx):
                    for slot, pos, tgt in reads[r]:
                        ll[layer, slot] += logp[bi, pos, tgt].item()
    N, K = len(req.contexts), req.cont_chars.shape[1]
    scores = np.full((L, N, K), np.nan, dtype=np.float32)
    for s, (i, k) in enumerate(owner):
        scores[:, i, k] = ll[:, s]
    return scores


def bf16_matmul_rate(m: int, k: int, n: int, reps: int = 3) -> float:
    """Measured FLOP/s of one ``[m, k] @ [k, n]`` product in the model's CPU precision (bf16), best of ``reps``."""
    a = torch.randn(m, k).bfloat16()
    w = torch.randn(n, k).bfloat16()  # stored as the LM head is: [out, in]
    torch.nn.functional.linear(a, w)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.nn.functional.linear(a, w)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best


def work_counts(lm, req) -> dict:
    """FLOPs of the cloze analysis's arithmetic: forward passes over the packed rows and the vocabulary
    projection at every distinct continuation position of every layer (matrix products only)."""
    cfg = lm.parts.config
    d, V, L = cfg.hidden_size, cfg.vocab_size, lm.parts.num_layers
    layer_params = sum(p.numel() for p in lm.parts.layers.parameters() if p.dim() == 2)  # per-token matmul weights
    rows, reads, _ = cloze_rows(req, pack=True)
    tokens = sum(len(r) for r in rows)
    positions = sum(len({pos for _, pos, _ in rd}) for rd in reads)
    return {"packed_tokens": tokens, "read_positions": positions, "layers": L, "d": d, "vocab": V,
            "forward_flop": 2.0 * layer_params * tokens, "projection_flop": 2.0 * d * V * positions * L}


def floor_estimate(lm, req) -> dict:
    """The arithmetic floor: FLOPs of forward + projections over bf16 matmul rates measured now, in this process."""
    w = work_counts(lm, req)
    cfg = lm.parts.config
    r_proj = bf16_matmul_rate(512, w["d"], w["vocab"])
    r_fwd = bf16_matmul_rate(2048, w["d"], cfg.intermediate_size)
    floor = w["forward_flop"] / r_fwd + w["projection_flop"] / r_proj
    return {**w, "bf16_gflops_projection_shape": round(r_proj / 1e9, 1), "bf16_gflops_forward_shape": round(r_fwd / 1e9, 1),
            "floor_s": round(floor, 2)}


def _classify(ev, vocab: int) -> str:
    """Category of one profiled op: by its input shapes (vocabulary-sized axes) and enclosing scope."""
    shapes = ev.input_shapes or []
    wide = any(vocab in s for s in shapes if isinstance(s, (list, tuple)))
    if wide:
        return "vocab_matmul" if any(k in ev.name for k in ("mm", "linear", "matmul", "mkldnn")) else "log_normalizer"
    names, p = [ev.name], ev.cpu_parent
    while p is not None:
        names.append(p.name)
        p = p.cpu_parent
    if "declens::layer" in names:
        return "forward_layers"
    if any(n.startswith(("Torch-Compiled Region", "TorchDynamo")) for n in names):
        return "log_normalizer"  # outside the layers only the lens' log-normaliser is compiled
    return "other_ops"


def profile_shares(lm, task: str, fmt: str, rows: int, max_tokens: int) -> dict:
    """Where declens's scoring time goes, on ``rows`` rows (torch profiler, shapes recorded): shares of the
    vocabulary product, the log-normaliser (elementwise work on ``[*, V]`` logits), the decoder layers
    and the rest (other ops and Python), of the profiled run's wall time."""
    from torch.profiler import ProfilerActivity, profile, record_function
    from declens import fastpath

    req = prepare(lm, load_task(task, limit=rows, seed=0), fmt)
    orig = fastpath.layer_forward

    def scoped(*args, **kw):
        with record_function("declens::layer"):
            return orig(*args, **kw)

    fastpath.layer_forward = scoped
    try:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            t0 = time.perf_counter()
            score(lm, req, max_tokens=max_tokens)
            wall = time.perf_counter() - t0
    finally:
        fastpath.layer_forward = orig
    vocab = lm.parts.config.vocab_size
    us = {"vocab_matmul": 0.0, "log_normalizer": 0.0, "forward_layers": 0.0, "other_ops": 0.0}
    for ev in prof.events():
        if not ev.name.startswith("declens::"):
            us[_classify(ev, vocab)] += ev.self_cpu_time_total
    secs = {k: v / 1e6 for k, v in us.items()}
    secs["python_and_unprofiled"] = max(0.0, wall - sum(secs.values()))
    return {"rows": rows, "wall_s": round(wall, 2), "seconds": {k: round(v, 2) for k, v in secs.items()},
            "shares": {k: round(v / wall, 3) for k, v in secs.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="arc_challenge")
    ap.add_argument("--format", default="letter", choices=["letter", "cloze"])
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--json", default=None, help="write the numbers here")
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS",
                    help="also profile declens on this many rows (torch profiler): time shares by kind of work")
    ap.add_argument("--eager-lse", action="store_true",
                    help="also time declens with the plain float32 log-normaliser (--fused-lse off), same process")
    ap.add_argument("--floor", action="store_true", help="cloze: also estimate the arithmetic floor (FLOPs / measured bf16 matmul rate)")
    a = ap.parse_args()

    torch.manual_seed(0)
    load = os.getloadavg()[0]  # the machine is shared: record how busy it was
    lm = load_model(a.model, dtype=a.dtype, progress=False)
    data = load_task(a.task, limit=a.limit, seed=0)
    req = prepare(lm, data, a.format)
    n = len(data.items)
    # warm-up on a few rows so one-time costs (thread pools, allocator, compiling the log-normaliser)
    # stay out of both timings; its time is recorded
    t0 = time.perf_counter()
    score(lm, prepare(lm, load_task(a.task, limit=4, seed=1), a.format), max_tokens=a.max_tokens)
    t_warm = time.perf_counter() - t0
    eager = {}
    if a.eager_lse:  # the same scoring with the plain float32 log-normaliser, same process
        fused = lm.options
        lm.options = dataclasses.replace(fused, fused_lse="off")
        t0 = time.perf_counter()
        ref = score(lm, req, max_tokens=a.max_tokens, progress=None)
        eager = {"declens_eager_lse_s": round(time.perf_counter() - t0, 2)}
        lm.options = fused

    t0 = time.perf_counter()
    ours = score(lm, req, max_tokens=a.max_tokens, progress=None)
    t_ours = time.perf_counter() - t0
    if eager:
        eager.update(eager_over_fused=round(eager["declens_eager_lse_s"] / t_ours, 2),
                     eager_max_abs_diff=float(np.nanmax(np.abs(ref.scores - ours.scores))))
    result = {"model": a.model, "task": a.task, "format": a.format, "items": n, "dtype": str(lm.dtype),
              "threads": torch.get_num_threads(), "load_avg_1min": round(load, 2), "declens_s": round(t_ours, 2), "declens_items_per_s": round(n / t_ours, 2),
              "final_acc": float((np.nanargmax(ours.final(), -1) == ours.gold).mean()), "warmup_s": round(t_warm, 2),
              **eager}
    if a.floor and a.format == "cloze":
        result["floor"] = floor_estimate(lm, req)
        result["declens_over_floor"] = round(t_ours / result["floor"]["floor_s"], 2)
    if a.profile:
        result["profile"] = profile_shares(lm, a.task, a.format, a.profile, a.max_tokens)
    write(result, a.json)  # partial: the peer may take long
    if not a.skip_peer:
        t0 = time.perf_counter()
        peer = naive_letter(lm, req, a.max_tokens) if a.format == "letter" else naive_cloze(lm, req, a.max_tokens)
        t_peer = time.perf_counter() - t0
        agree = float((np.nanargmax(peer[-1], -1) == np.nanargmax(ours.final(), -1)).mean())
        result.update({"peer_s": round(t_peer, 2), "peer_items_per_s": round(n / t_peer, 2),
                       "speedup": round(t_peer / t_ours, 2), "final_prediction_agreement": agree,
                       "max_abs_diff_all_layers": float(np.nanmax(np.abs(peer - ours.scores)))})
    print(json.dumps(result, indent=2))
    write(result, a.json)


def write(result: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
