"""The real SmolLM2-135M through the lens on two devices: a bf16 GPU run against the float32 CPU run.

Analyses 200 ARC-Challenge rows in the letter format and 200 ARC-Easy rows in the cloze format (seed 0)
and writes every row's final-layer answer and margin and the per-layer mean Decision Margin to a JSON
file; ``--compare A.json B.json`` prints how far two such files agree (same answers, largest margin and
per-layer DM differences). BENCHMARKS.md has the commands (the GGUF reaches the GPU machine in parts).

    python benchmarks/real_weights_check.py --model smollm2-135m --dtype float32 --device cpu --out cpu.json
    python benchmarks/real_weights_check.py --model /tmp/keep/smollm2.gguf --dtype bfloat16 --device cuda --out gpu.json
    python benchmarks/real_weights_check.py --compare cpu.json gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

CASES = (("arc_challenge", "letter"), ("arc_easy", "cloze"))


def run(args) -> None:
    from declens.analyses.decision import analyze
    from declens.models import load_model
    from declens.tasks import load_task

    lm = load_model(args.model, dtype=args.dtype, device=args.device, progress=False)
    out = {"model": args.model, "dtype": args.dtype, "device": args.device}
    for task, fmt in CASES:
        res = analyze(lm, load_task(task, limit=args.limit, seed=0), fmt, progress=False)
        s = res.sample_rows()
        out[f"{task}/{fmt}"] = {"pred": [r["pred"] for r in s], "margin": [r["margin"] for r in s],
                                "dm": [float(x) for x in res.metrics.dm], "accuracy": float(res.metrics.acc[-1])}
        print(task, fmt, "accuracy", out[f"{task}/{fmt}"]["accuracy"], flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f)


def compare(a_path: str, b_path: str) -> dict:
    a, b = (json.load(open(p)) for p in (a_path, b_path))
    rep = {}
    for key in (f"{t}/{f}" for t, f in CASES):
        x, y = a[key], b[key]
        rep[key] = {"same_answers": sum(p == q for p, q in zip(x["pred"], y["pred"])), "rows": len(x["pred"]),
                    "max_margin_diff": max(abs(p - q) for p, q in zip(x["margin"], y["margin"])),
                    "max_layer_dm_diff": max(abs(p - q) for p, q in zip(x["dm"], y["dm"])),
                    "accuracy": [x["accuracy"], y["accuracy"]]}
    print(json.dumps(rep, indent=1))
    return rep


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--out", default="real_check.json")
    ap.add_argument("--compare", nargs=2, metavar="JSON")
    a = ap.parse_args()
    compare(*a.compare) if a.compare else run(a)
