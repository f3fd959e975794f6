"""GPU benchmark: the whole ``declens study`` (no fine-tuning) on Llama-3-8B's shapes, each stage timed.

Builds the Llama-3-8B-shaped model with random weights in bf16 on the GPU (``gpu_bench.build``), token
ids from SmolLM2's shipped tokenizer, and runs :func:`declens.analyses.study.run_study` on ARC-Challenge
and ARC-Easy (letter format, all test rows) with the stages analysis, prune (Iterative Pruning
replaying the paper's Table 2 order through ``StudyConfig.ip_order``: random weights make Block
Influence's own choice meaningless), baselines (shortgpt, sleb, angular, last, random to 50%), cka,
noise and ablate. After every stage event it rewrites ``gpu_study.json`` under ``--out``: each stage's
seconds, the total, the peak memory (so a run cut at 10 minutes still reports the stages it finished).
The study folder (``--study-dir``) survives on a warm machine: a rerun resumes at the first unfinished
stage (finished ones are reported as ``skip``).

On the device machine::

    PYTHONPATH=src python benchmarks/gpu_study.py --out $OUT

``--tiny`` runs the same study on CPU with a narrow 8-layer Llama config, a few rows and the Table 2
order mapped onto 8 layers (smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from gpu_bench import LLAMA3_8B, ORDERS, build, sync  # noqa: E402

from declens.analyses.study import StageEvent, StudyConfig, run_study  # noqa: E402
from declens.models import LoadedModel  # noqa: E402

STAGES = ["analysis", "prune", "baselines", "cka", "noise", "ablate"]


def peak_gib(device) -> float:
    """Peak GPU memory allocated (GiB), or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=".carry/smollm2-tokenizer")
    ap.add_argument("--tiny", action="store_true", help="narrow 8-layer config on the CPU, few rows (smoke test)")
    ap.add_argument("--limit", type=int, default=None, help="rows per task (default: all; --tiny: 4)")
    ap.add_argument("--calib-samples", type=int, default=None, help="calibration rows (default 256; --tiny: 4)")
    ap.add_argument("--study-dir", default=os.path.join(tempfile.gettempdir(), "declens_gpu_study"))
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run (default: all six)")
    ap.add_argument("--tasks", default="arc_challenge,arc_easy", help="comma-separated tasks")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    from transformers import AutoTokenizer
    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_study.json")
    shape = {**LLAMA3_8B, "num_hidden_layers": 8} if args.tiny else LLAMA3_8B
    L = shape["num_hidden_layers"]  # the Table 2 order (50% of 32 layers), mapped onto L layers for --tiny
    order = list(dict.fromkeys(i * L // 32 for i in ORDERS["llama3-8b"]))[: L // 2]
    cfg = StudyConfig(tasks=args.tasks.split(","), formats=["letter"],
                      limit=args.limit if args.limit is not None else (4 if args.tiny else None),
                      ip_max_ratio=len(order) / L, ip_order=order, baseline_ratio=0.5,
                      calib_samples=args.calib_samples or (4 if args.tiny else 256), cka_ratio=0.5,
                      cka_rows=8 if args.tiny else 500, recover_ratios=[], stages=args.stages.split(","))
    rec = {"env": {"torch": torch.__version__, "transformers": transformers.__version__,
                   "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "tiny": args.tiny},
           "config": asdict(cfg), "study_dir": args.study_dir, "events": [], "stage_s": {}, "complete": False}

    def write() -> None:
        rec["peak_mem_gib"] = peak_gib(device)
        with open(path + ".tmp", "w") as f:
            json.dump(rec, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    model = build(shape, device, args.tiny)
    sync()
    rec["build_s"] = round(time.perf_counter() - t0, 2)
    lm = LoadedModel(model=model, tokenizer=tok, spec="llama3-8b-random",
                     source={"kind": "random-config", "shape": "llama3-8b"})
    write()

    def on_event(ev: StageEvent) -> None:
        sync()
        rec["events"].append({**asdict(ev), "seconds": round(ev.seconds, 3), "at_s": round(time.perf_counter() - t1, 3),
                              "peak_mem_gib": peak_gib(device)})
        if ev.status == "done":
            rec["stage_s"][f"{ev.stage}/{ev.key}"] = round(ev.seconds, 3)
        rec["study_s_so_far"] = round(time.perf_counter() - t1, 3)
        print(f"{ev.stage} {ev.key} {ev.status} {ev.seconds:.1f} s {ev.summary}", flush=True)
        write()

    t1 = time.perf_counter()
    study = run_study(lm, cfg, args.study_dir, on_event=on_event, progress=False)
    sync()
    rec["study_s"] = round(time.perf_counter() - t1, 3)
    rec["timings_s"] = {k: round(v, 3) for k, v in study.timings.items()}
    per_stage = {}
    for k, v in study.timings.items():
        per_stage[k.split("/")[0]] = round(per_stage.get(k.split("/")[0], 0.0) + v, 3)
    rec["per_stage_s"] = per_stage
    rec["complete"] = True
    write()
    print(json.dumps({k: rec[k] for k in ("build_s", "study_s", "per_stage_s", "peak_mem_gib")}), flush=True)


if __name__ == "__main__":
    main()
