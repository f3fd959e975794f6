"""GPU benchmark of the cloze path: HellaSwag validation through the lens at every layer.

Builds a Llama-3-8B-shaped model with random weights on the GPU (bf16), tokenizes HellaSwag's
validation rows (all 10,042 by default) with a shipped tokenizer (SmolLM2's), and times
``analyze(lm, data, "cloze")`` with every layer read through the lens and with the final layer only.
It reports the forward and vocabulary-projection FLOPs, the model FLOP utilisation against the bf16
matrix-product rate measured in the same process, and the peak GPU memory. ``--profile N`` also
writes a torch profiler table of an N-row run (where the time goes).

Run on the device machine (BENCHMARKS.md has the exact command)::

    PYTHONPATH=src python benchmarks/gpu_cloze.py --tokenizer .carry/smollm2-tokenizer --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from declens.analyses.decision import AnalyzeConfig, analyze, prepare  # noqa: E402
from declens.execution import FASTPATH_MODES, ExecutionOptions  # noqa: E402
from declens.models import LoadedModel  # noqa: E402
from declens.tasks import load_task  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from gpu_bench import LLAMA3_8B, build, flops_per_token, matmul_peak, sync  # noqa: E402


def cloze_flops(cfg, req) -> dict:
    """Forward FLOPs of the packed rows (context once per item) and lens FLOPs at continuation positions."""
    ctx = sum(len(c[0]) for c in req.contexts)
    cont = sum(len(x) for cs in req.continuations for x in cs)
    tokens = ctx + cont
    mean_len = tokens / max(1, len(req.contexts))
    fwd = flops_per_token(cfg, mean_len) * tokens
    lens_per_layer = 2 * cfg.hidden_size * cfg.vocab_size * cont
    return {"context_tokens": ctx, "continuation_tokens": cont, "forward_pflop": fwd / 1e15,
            "lens_pflop_per_layer": lens_per_layer / 1e15, "layers": cfg.num_hidden_layers}


def timed(lm, data, req, lens_layers):
    torch.cuda.reset_peak_memory_stats()
    sync()
    t = time.perf_counter()
    res = analyze(lm, data, "cloze", AnalyzeConfig(lens_layers=lens_layers), requests=req, progress=False)
    sync()
    return time.perf_counter() - t, res, torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=".carry/smollm2-tokenizer")
    ap.add_argument("--limit", type=int, default=None, help="HellaSwag validation rows (default: all 10,042)")
    ap.add_argument("--variants", default="all,last", help="lens read-outs to time: all, last")
    ap.add_argument("--profile", type=int, default=0, help="also profile a run over this many rows")
    ap.add_argument("--profile-lens", default="all", help="lens read-out of the profiled run: all or last")
    ap.add_argument("--check", type=int, default=200, help="rows scored with the fused and the plain log-normaliser, compared")
    ap.add_argument("--fastpath", default="auto", choices=FASTPATH_MODES, help="the lean decoder loop: auto, off or compile")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    from transformers import AutoTokenizer

    device = torch.device("cuda")
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    peak = matmul_peak(device)
    model = build(LLAMA3_8B, device, tiny=False)
    lm = LoadedModel(model=model, tokenizer=tok, spec="llama3-8b-random", source={"kind": "random-config"})
    lm.options = ExecutionOptions(fastpath=args.fastpath)
    data = load_task("hellaswag", limit=args.limit, seed=0)
    t = time.perf_counter()
    req = prepare(lm, data, "cloze")
    row = {"device": torch.cuda.get_device_name(device), "rows": len(data.items), "prepare_s": time.perf_counter() - t,
           "matmul_peak_tflops": peak / 1e12, **cloze_flops(model.config, req)}
    warm = load_task("hellaswag", limit=64, seed=1)
    analyze(lm, warm, "cloze", progress=False)
    if args.check:
        sub = load_task("hellaswag", limit=args.check, seed=3)
        sreq = prepare(lm, sub, "cloze")
        fused = analyze(lm, sub, "cloze", requests=sreq, progress=False).scores.scores
        options = lm.options
        lm.options = dataclasses.replace(options, fused_lse="off")  # the plain float32 log-normaliser
        plain = analyze(lm, sub, "cloze", requests=sreq, progress=False).scores.scores
        lm.options = options
        diff = abs(fused - plain)
        row["fused_vs_plain"] = {"rows": args.check, "max_abs_diff": float(diff.max()),
                                 "same_final_answers": int((fused[-1].argmax(-1) == plain[-1].argmax(-1)).sum())}
        print("check", row["fused_vs_plain"], flush=True)
    for v in args.variants.split(","):
        s, res, mem = timed(lm, data, req, None if v == "all" else "last")
        n_read = len(res.metrics.layer_ids)
        flop = row["forward_pflop"] + row["lens_pflop_per_layer"] * n_read
        row[v] = {"seconds": s, "peak_mem_gib": mem, "pflop": flop, "mfu": flop * 1e15 / s / peak,
                  "floor_s": flop * 1e15 / peak, "final_acc": float(res.metrics.acc[-1]),
                  "final_acc_norm": float(res.metrics.acc_norm[-1]) if res.metrics.acc_norm is not None else None}
        print(v, json.dumps(row[v]), flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        sub = load_task("hellaswag", limit=args.profile, seed=2)
        sreq = prepare(lm, sub, "cloze")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            analyze(lm, sub, "cloze", AnalyzeConfig(lens_layers=None if args.profile_lens == "all" else "last"),
                    requests=sreq, progress=False)
            sync()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
        print(table)
        with open(os.path.join(args.out, "gpu_cloze_profile.txt"), "w") as f:
            f.write(table)
    print(json.dumps(row, indent=1))
    with open(os.path.join(args.out, "gpu_cloze.json"), "w") as f:
        json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
