"""Where declens' time goes in one ``analyze`` run on the GPU: host (Python) against device work.

Profiles ``prepare`` + ``analyze(lm, data, fmt, AnalyzeConfig(lens_layers=...))`` on the Llama-3-8B-shaped model
(random weights, bf16) with ``cProfile`` (host-side Python by function) after an untimed warm-up,
and reports the wall time, the time the host spent waiting for the GPU (``cudaStreamSynchronize``
and blocking copies show up as ``item``/``cpu``/``tolist`` calls) and the top functions.

GPU (device tool, kind ``nvidia-h200``, carry ``[".carry/smollm2-tokenizer"]``)::

    PYTHONPATH=src python3 benchmarks/gpu_profile.py --task hellaswag --format cloze --fastpath compile --out $OUT

CPU smoke test: ``python benchmarks/gpu_profile.py --tiny --limit 40``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from gpu_bench import LLAMA3_8B, build, sync

from declens.analyses.decision import AnalyzeConfig, analyze
from declens.execution import FASTPATH_MODES, ExecutionOptions
from declens.formats import prepare
from declens.models import LoadedModel
from declens.tasks import load_task


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default=".carry/smollm2-tokenizer")
    ap.add_argument("--task", default="hellaswag")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--format", default="cloze", choices=("letter", "cloze"))
    ap.add_argument("--lens-layers", default="last", help="'last' or 'all'")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--fastpath", default="auto", choices=FASTPATH_MODES)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    lm = LoadedModel(model=build(LLAMA3_8B, device, args.tiny), tokenizer=tok, spec="llama3-8b-random")
    lm.options = ExecutionOptions(fastpath=args.fastpath)
    layers = None if args.lens_layers == "all" else "last"
    analyze(lm, load_task(args.task, split=args.split, limit=32, seed=1), args.format, AnalyzeConfig(lens_layers=layers),
            progress=False, plots=False)  # warm-up (compiles)
    sync()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    data = load_task(args.task, split=args.split, limit=args.limit)
    req = prepare(lm, data, args.format)
    t_prep = time.perf_counter() - t0
    analyze(lm, data, args.format, AnalyzeConfig(lens_layers=layers), requests=req, progress=False, plots=False)
    sync()
    prof.disable()
    wall = time.perf_counter() - t0
    text = {}
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats(key).print_stats(args.top)
        text[key] = s.getvalue()
    report = {"task": args.task, "format": args.format, "rows": len(data.items), "fastpath": args.fastpath,
              "lens_layers": args.lens_layers, "wall_s": round(wall, 2), "load_and_tokenize_s": round(t_prep, 2),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    print(json.dumps(report))
    print(text["tottime"])
    print(text["cumulative"])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"profile_{args.task}_{args.format}.json"), "w") as f:
        json.dump({**report, "profile": text}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
