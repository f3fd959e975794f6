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
import json
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
    a = ap.parse_args()

    torch.manual_seed(0)
    lm = load_model(a.model, dtype=a.dtype, progress=False)
    data = load_task(a.task, limit=a.limit, seed=0)
    req = prepare(lm, data, a.format)
    n = len(data.items)
    # warm-up on a few rows so one-time costs (thread pools, allocator) stay out of both timings
    score(lm, prepare(lm, load_task(a.task, limit=4, seed=1), a.format), max_tokens=a.max_tokens)

    t0 = time.perf_counter()
    ours = score(lm, req, max_tokens=a.max_tokens, progress=None)
    t_ours = time.perf_counter() - t0
    result = {"model": a.model, "task": a.task, "format": a.format, "items": n, "dtype": str(lm.dtype),
              "threads": torch.get_num_threads(), "declens_s": round(t_ours, 2), "declens_items_per_s": round(n / t_ours, 2),
              "final_acc": float((np.nanargmax(ours.final(), -1) == ours.gold).mean())}
    if not a.skip_peer:
        t0 = time.perf_counter()
        peer = naive_letter(lm, req, a.max_tokens) if a.format == "letter" else naive_cloze(lm, req, a.max_tokens)
        t_peer = time.perf_counter() - t0
        agree = float((np.nanargmax(peer[-1], -1) == np.nanargmax(ours.final(), -1)).mean())
        result.update({"peer_s": round(t_peer, 2), "peer_items_per_s": round(n / t_peer, 2),
                       "speedup": round(t_peer / t_ours, 2), "final_prediction_agreement": agree,
                       "max_abs_diff_all_layers": float(np.nanmax(np.abs(peer - ours.scores)))})
    print(json.dumps(result, indent=2))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
