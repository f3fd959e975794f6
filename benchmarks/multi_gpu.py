"""Scale beyond one GPU: data-parallel runs under ``torchrun`` and a model sharded over GPUs.

Modes (one process each, or ``torchrun --nproc-per-node N`` for ``ddp``):

- ``single``: a Llama-3-8B-shaped model (random weights, seed 0, bf16) on one GPU; the dense
  analysis of ARC-Challenge (1172 questions, letter format) and an Iterative Pruning replay to 50%;
  scores saved for comparison.
- ``ddp``: the same under ``torchrun``: every rank builds the same weights on its own GPU, scores its
  share of the batches; results are gathered, rank 0 saves them.
- ``shard``: the same model split layer-wise over all visible GPUs with accelerate
  (``infer_auto_device_map`` under a per-GPU memory cap, then ``dispatch_model``), compared with the
  unsharded model on one GPU, both through the model's own forward (hooks), plus a few pruning steps.
- ``compare``: single vs ddp vs shard score files: predictions and Decision Margins.

Example (2 GPUs)::

    PYTHONPATH=src python benchmarks/multi_gpu.py single --out $OUT
    PYTHONPATH=src torchrun --nproc-per-node 2 benchmarks/multi_gpu.py ddp --out $OUT
    PYTHONPATH=src python benchmarks/multi_gpu.py shard --out $OUT
    PYTHONPATH=src python benchmarks/multi_gpu.py compare --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from declens import distributed  # noqa: E402
from declens.analyses.decision import AnalyzeConfig, analyze  # noqa: E402
from declens.execution import ExecutionOptions  # noqa: E402
from declens.metrics import margins, predictions  # noqa: E402
from declens.models import LoadedModel  # noqa: E402
from declens.pruning import PruneConfig, prune  # noqa: E402
from declens.tasks import load_task  # noqa: E402
from gpu_bench import LLAMA3_8B, ORDERS, build  # noqa: E402


#: one batch plan for every mode (the plan decides the batches, and bf16 numerics depend on them)
MT = 32768


def sync_all():
    if torch.cuda.is_available():
        for d in range(torch.cuda.device_count()):
            torch.cuda.synchronize(d)


def timed(fn):
    sync_all()
    t = time.perf_counter()
    out = fn()
    sync_all()
    return out, time.perf_counter() - t


def save(out, name, res, extra):
    np.savez(os.path.join(out, f"{name}.npz"), scores=res.scores.scores, gold=res.scores.gold)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(extra, f, indent=2)
    print(name, json.dumps(extra), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["single", "ddp", "shard", "compare"])
    ap.add_argument("--tokenizer", default=".carry/smollm2-tokenizer")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--cap", default="9GiB", help="shard: memory cap per GPU")
    ap.add_argument("--ip-steps", type=int, default=16)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tiny", action="store_true", help="tiny config on the CPU (smoke test; gloo for ddp)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if a.mode == "compare":
        return compare(a.out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    data = load_task("arc_challenge", limit=a.limit, seed=0)
    if a.mode == "ddp":
        distributed.init_from_env()
    device = distributed.local_device() or torch.device("cuda" if torch.cuda.is_available() else "cpu", 0)
    model = build(LLAMA3_8B, device, tiny=a.tiny)
    lm = LoadedModel(model=model, tokenizer=tok, spec="llama3-8b-random", source={"kind": "random-config"})
    order = ORDERS["llama3-8b"][: a.ip_steps]
    if a.mode in ("single", "ddp"):
        analyze(lm, load_task("arc_challenge", limit=64, seed=1), "letter", progress=False)  # warm-up
        res, t_an = timed(lambda: analyze(lm, data, "letter", AnalyzeConfig(max_tokens=MT), progress=False))
        times = [t_an]
        for _ in range(2):
            res, t = timed(lambda: analyze(lm, data, "letter", AnalyzeConfig(max_tokens=MT), progress=False))
            times.append(t)
        pr, t_ip = timed(lambda: prune(lm, data, "letter",
                                       PruneConfig(["replay"], order=order, max_ratio=len(order) / 32, calib_samples=256,
                                                   calib_from_eval=True, max_tokens=MT), progress=False, plots=False))
        if distributed.is_main():
            save(a.out, a.mode, res, {"mode": a.mode, "ranks": distributed.world(), "analyze_s": [round(x, 3) for x in times],
                                      "ip_replay_s": round(t_ip, 3), "ip_steps": len(order),
                                      "ip_acc": [r.final_accuracy for r in pr.runs["replay"].records],
                                      "ip_bi_step1": pr.runs["replay"].records[1].bi,
                                      "final_acc": res.metrics.final_acc,
                                      "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"})
        return
    # shard: reference through the model's own forward on one GPU, then split over all GPUs
    from accelerate import dispatch_model, infer_auto_device_map

    lm.options = ExecutionOptions(fastpath="off")
    ref, t_ref = timed(lambda: analyze(lm, data, "letter", AnalyzeConfig(max_tokens=MT), progress=False))
    n = torch.cuda.device_count()
    dmap = infer_auto_device_map(model, max_memory={i: a.cap for i in range(n)},
                                 no_split_module_classes=[type(model.model.layers[0]).__name__])
    per_dev = {}
    for k, v in dmap.items():
        per_dev.setdefault(str(v), []).append(k)
    model = dispatch_model(model, device_map=dmap)
    lm = LoadedModel(model=model, tokenizer=tok, spec="llama3-8b-random-sharded", source={"kind": "random-config"})
    analyze(lm, load_task("arc_challenge", limit=64, seed=1), "letter", progress=False)  # warm-up
    res, t_sh = timed(lambda: analyze(lm, data, "letter", AnalyzeConfig(max_tokens=MT), progress=False))
    pr, t_ip = timed(lambda: prune(lm, data, "letter",
                                   PruneConfig(["replay"], order=order[:3], max_ratio=3 / 32, calib_samples=64,
                                               calib_from_eval=True, max_tokens=MT), progress=False, plots=False))
    np.savez(os.path.join(a.out, "shard_ref.npz"), scores=ref.scores.scores, gold=ref.scores.gold)
    layer_devices = sorted({str(p.device) for p in model.model.layers.parameters()})
    save(a.out, "shard", res, {"mode": "shard", "gpus": n, "cap_per_gpu": a.cap, "layer_devices": layer_devices,
                               "modules_per_device": {k: len(v) for k, v in per_dev.items()},
                               "unsharded_s": round(t_ref, 3), "sharded_s": round(t_sh, 3),
                               "ip_3_steps_sharded_s": round(t_ip, 3),
                               "ip_acc": [r.final_accuracy for r in pr.runs["replay"].records],
                               "final_acc": res.metrics.final_acc, "final_acc_unsharded": ref.metrics.final_acc})


def compare(out):
    def load(name):
        p = os.path.join(out, f"{name}.npz")
        return np.load(p) if os.path.exists(p) else None

    rows = {}
    pairs = [("single", "ddp"), ("shard_ref", "shard")]
    for a_name, b_name in pairs:
        a, b = load(a_name), load(b_name)
        if a is None or b is None:
            continue
        sa, sb, gold = a["scores"], b["scores"], a["gold"]
        rows[f"{a_name} vs {b_name}"] = {
            "same_final_predictions": bool((predictions(sa[-1:]) == predictions(sb[-1:])).all()),
            "same_predictions_all_layers": float((predictions(sa) == predictions(sb)).mean()),
            "max_abs_dm_diff": float(np.abs(margins(sa, gold).mean(1) - margins(sb, gold).mean(1)).max()),
            "max_abs_score_diff": float(np.nanmax(np.abs(sa - sb))),
        }
    info = {}
    for name in ("single", "ddp", "shard"):
        p = os.path.join(out, f"{name}.json")
        if os.path.exists(p):
            info[name] = json.load(open(p))
    if "single" in info and "ddp" in info:
        s, d = min(info["single"]["analyze_s"]), min(info["ddp"]["analyze_s"])
        rows["ddp_speedup_analyze"] = round(s / d, 2)
        rows["ddp_speedup_ip"] = round(info["single"]["ip_replay_s"] / info["ddp"]["ip_replay_s"], 2)
        rows["ip_acc_equal"] = info["single"]["ip_acc"] == info["ddp"]["ip_acc"]
    print(json.dumps(rows, indent=2))
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump({"comparisons": rows, "runs": info}, f, indent=2)


if __name__ == "__main__":
    main()
