"""declens against lm-evaluation-harness on the same GPU, the same model object and the same rows.

Builds a Llama-3-8B-shaped model with random weights in bf16 on the GPU (``gpu_bench.build``) and a
shipped tokenizer (SmolLM2's), then, for each task, times in this one process:

(a) lm-eval's Hugging Face backend: ``HFLM(pretrained=model, tokenizer=tok, batch_size="auto")``
    through ``lm_eval.evaluator.simple_evaluate``, zero-shot, on lm-eval's own stock task
    definitions (``hellaswag``; ``mmlu_<subject>``, its letter-prompt MMLU, one task per subject as
    its ``mmlu`` group runs them) instantiated on declens' bundled rows
    (``prompt_parity.StockTasks.build``: the stock YAML and ``utils.py`` with a
    ``datasets.Dataset`` built from the rows in the fields of the Hugging Face dataset it reads;
    there is no dataset hub on the GPU machine);
(b) declens: ``load_task`` + ``analyze(lm, data, fmt, AnalyzeConfig(lens_layers="last"))`` (HellaSwag cloze, MMLU
    letter), the model's own output only, as lm-eval reads it.

Each tool's time is its whole run once the model is on the GPU: lm-eval's covers building its task
objects from the rows, the ``HFLM`` wrapper, its automatic batch-size search and the evaluation
(its ``TaskManager`` index of the stock task folders is built once beforehand and handed to
``simple_evaluate``, as ``prompt_parity`` does; ``bootstrap_iters=0``); declens' covers row
selection, tokenization and the analysis. Both tools first run a small warm-up (kernels,
allocator) outside the timings. Per row it compares the prompt strings lm-eval logged with
declens' and each tool's answer (argmax of the option log-likelihoods; HellaSwag also
``acc_norm``, per character); a disagreement is a near tie when the two options' gap in either tool
is no larger than the difference between the tools' (centred) scores on that row: bf16 rounding
and batch shapes (lm-eval takes its log-softmax in bf16, its default ``softmax_dtype``) can
swap such answers. The JSON (``<out>/gpu_lmeval.json``) is rewritten after each task.

Wheels for the GPU machine. Its image has torch, transformers, accelerate, numpy, pandas, pyarrow,
xxhash, fsspec, huggingface-hub, jinja2, pyyaml, sacrebleu (lm_eval.api.metrics imports it) and
tqdm, but not lm_eval, datasets (lm_eval.api.task imports it; the tasks are built from
``datasets.Dataset``), dill or multiprocess (datasets needs both). Those four are all this run needs:
``.whl/lmeval/`` holds lm_eval-0.4.13, datasets-5.2.0, dill-0.4.1 and multiprocess-0.70.19 (py312),
about 10 MB (lm_eval's wheel is 9 MB of task YAMLs). lm_eval's other requirements (evaluate,
pytablewriter, rouge-score, sqlitedict, word2number, more_itertools) are imported only
by other tasks, metrics or output paths. Checked by installing exactly these wheels with
``--no-deps`` into an empty folder and running ``--tiny`` in a fresh venv that sees only the packages
of the GPU image's list (KINDS.md) that exist in the project venv, plus that folder::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/lmeval/*.whl

datasets 5.2.0 wants pyarrow>=24, fsspec<=2026.9.0 and huggingface-hub>=1.31 (the image has 1.33);
the GPU command prints the image's versions first.

GPU command (device tool, ``carry=[".whl/lmeval", ".carry/smollm2-tokenizer"]``, about 25 MB with the
working tree; one task per call, since each call is cut at 10 minutes, then ``--tasks mmlu``)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/lmeval/*.whl \\
      && export PYTHONPATH=/tmp/site:src && python3 -m pip list 2>/dev/null | grep -iE "^(pyarrow|fsspec|pandas) "; \\
      python3 benchmarks/gpu_lmeval.py --tasks hellaswag --out $OUT

CPU smoke test (tiny random Llama, project venv)::

    python benchmarks/gpu_lmeval.py --tiny --limit 12 --warmup 4 --max-batch-size 8 --out runs/gpu_lmeval_tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from gpu_bench import LLAMA3_8B, build, sync
from prompt_parity import STOCK, StockTasks, declens_requests

from declens.analyses.decision import AnalyzeConfig, analyze
from declens.execution import FASTPATH_MODES, ExecutionOptions
from declens.formats import prepare
from declens.models import LoadedModel
from declens.tasks import get_spec, load_task, read_split, subsample

#: declens reads only the model's own output (the final layer), as lm-eval does
LAST = AnalyzeConfig(lens_layers="last")

# declens task -> (split, format): HellaSwag validation in the cloze format, MMLU test with letter prompts
TASKS = {"hellaswag": ("validation", "cloze"), "mmlu": ("test", "letter")}


@dataclass
class Run:
    """One tool's run of one task: wall seconds and, per selected row (in declens' order), the option
    scores (``[N, K]``: lm-eval's log-likelihoods, declens' logits or log-likelihoods), the per-character
    scores (cloze; ``None`` otherwise) and the (context, continuation) pairs (lm-eval only)."""

    seconds: float
    scores: np.ndarray
    norm: np.ndarray | None = None
    pairs: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def _groups(stock: StockTasks, task: str, fmt: str, split: str, idx: list[int]) -> list[tuple[str, list[int]]]:
    """(lm-eval task name, selected row indices) per stock task: one per MMLU subject, in declens' order."""
    docs = stock.split_docs(task, split)
    groups: dict[str, list[int]] = {}
    for i in idx:
        groups.setdefault(STOCK[task][fmt].format(subject=docs[i].get("subject", "")), []).append(i)
    return list(groups.items())


def _pairs(sample: dict) -> list[tuple[str, str]]:
    """The (context, continuation) pairs of one logged lm-eval sample (0.4.x logs ``{"gen_args_k":
    {"arg_0": context, "arg_1": continuation}}``)."""
    a = sample["arguments"]
    a = [a[k] for k in sorted(a, key=lambda k: int(k.rsplit("_", 1)[-1]))] if isinstance(a, dict) else a
    return [(x["arg_0"], x["arg_1"]) if isinstance(x, dict) else (x[0], x[1]) for x in a]


def run_lmeval(model, tok, stock: StockTasks, task: str, idx: list[int], max_batch_size: int) -> Run:
    """lm-eval's HF backend on rows ``idx`` of the task's split, through ``simple_evaluate``."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    split, fmt = TASKS[task]
    sync()
    t = time.perf_counter()
    groups = _groups(stock, task, fmt, split, idx)
    docs = stock.split_docs(task, split)
    tasks = [stock.build(name, {split: [docs[i] for i in rows]})[0] for name, rows in groups]
    hflm = HFLM(pretrained=model, tokenizer=tok, batch_size="auto", max_batch_size=max_batch_size)
    out = simple_evaluate(model=hflm, tasks=tasks, num_fewshot=0, bootstrap_iters=0, log_samples=True,
                          task_manager=stock.manager)
    sync()
    seconds = time.perf_counter() - t
    pos = {i: n for n, i in enumerate(idx)}
    k = 4
    scores = np.full((len(idx), k), np.nan)
    pairs: list = [None] * len(idx)
    for name, rows in groups:
        for s in out["samples"][name]:
            n = pos[rows[s["doc_id"]]]
            ll = [float(r[0]) for r in s["filtered_resps"]]
            scores[n, : len(ll)] = ll
            pairs[n] = _pairs(s)
    acc = {name: out["results"][name].get("acc,none") for name, _ in groups}
    return Run(seconds=seconds, scores=scores, pairs=pairs,
               extra={"batch_sizes": list(getattr(hflm, "batch_sizes", {}).values()) or hflm.batch_size,
                      "lmeval_acc_by_task": acc if len(acc) <= 3 else None})


def run_declens(lm: LoadedModel, task: str, limit: int | None, seed: int) -> tuple[Run, object]:
    """declens' final-layer analysis of the same rows; returns the run and the selected data."""
    split, fmt = TASKS[task]
    sync()
    t = time.perf_counter()
    data = load_task(task, split=split, limit=limit, seed=seed)
    req = prepare(lm, data, fmt)  # tokenizing (timed: part of the run), split out to show where the time goes
    t_prep = time.perf_counter() - t
    res = analyze(lm, data, fmt, LAST, requests=req, progress=False, plots=False)
    sync()
    seconds = time.perf_counter() - t
    s = res.scores
    norm = None if s.norm_scores is None else np.asarray(s.norm_scores[-1], dtype=np.float64)
    return Run(seconds=seconds, scores=np.asarray(s.scores[-1], dtype=np.float64), norm=norm,
               extra={"load_and_tokenize_s": round(t_prep, 2), "fastpath": lm.options.fastpath}), data


def _gap(v: np.ndarray) -> float:
    """Gap between the two highest finite entries."""
    w = np.sort(v[np.isfinite(v)])[::-1]
    return float(w[0] - w[1]) if len(w) > 1 else float("inf")


def compare(task: str, data, lm: Run, dl: Run, seed: int) -> dict:
    """Per-row prompt strings and answers of the two tools (``acc``; ``acc_norm`` in cloze)."""
    _, fmt = TASKS[task]
    items = data.items
    prompt_diff = [i for i, it in enumerate(items) if lm.pairs[i] != declens_requests(fmt, data, it, 0, seed)]
    gold = np.array([it.gold for it in items])
    n_chars = np.array([[len(c) for c in it.choices] + [np.nan] * (4 - len(it.choices)) for it in items], dtype=np.float64)
    views = [("acc", lm.scores, dl.scores)]
    if dl.norm is not None:  # lm-eval's acc_norm: log-likelihood / len(choice), as declens' norm_scores
        views.append(("acc_norm", lm.scores / n_chars, dl.norm))
    out = {"rows": len(items), "prompt_strings_identical": len(items) - len(prompt_diff),
           "prompt_differences": prompt_diff[:10]}
    for name, a, b in views:
        pa, pb = np.nanargmax(a, 1), np.nanargmax(b, 1)
        ca = a - np.nanmean(a, 1, keepdims=True)
        cb = b - np.nanmean(b, 1, keepdims=True)
        delta = np.nanmax(np.abs(ca - cb), 1)  # per row: how far the two tools' centred scores differ
        dis = np.nonzero(pa != pb)[0]
        rows = []
        for i in dis:
            ga, gb = _gap(a[i]), _gap(b[i])
            rows.append({"row": int(i), "id": items[i].id, "lm_eval": int(pa[i]), "declens": int(pb[i]),
                         "gap_lm_eval": ga, "gap_declens": gb, "score_delta": float(delta[i]),
                         "near_tie": bool(min(ga, gb) <= delta[i])})
        out[name] = {
            "lm_eval": float(np.mean(pa == gold)), "declens": float(np.mean(pb == gold)),
            "agree": int(np.sum(pa == pb)), "disagree": len(dis),
            "disagree_near_tie": int(sum(r["near_tie"] for r in rows)),
            "disagree_unexplained": int(sum(not r["near_tie"] for r in rows)),
            "exact_ties_lm_eval": int(sum(_gap(a[i]) == 0 for i in range(len(items)))),
            "exact_ties_declens": int(sum(_gap(b[i]) == 0 for i in range(len(items)))),
            "centred_score_delta_median": float(np.median(delta)), "centred_score_delta_max": float(np.max(delta)),
            "disagreements": rows[:200],
        }
    return out


def _quiet() -> None:
    for name in ("lm-eval", "lm_eval", "lm_eval.api.task", "lm_eval.evaluator", "lm_eval.models.huggingface",
                 "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=".carry/smollm2-tokenizer")
    ap.add_argument("--tasks", default="hellaswag,mmlu", help=f"comma-separated, from {', '.join(TASKS)}")
    ap.add_argument("--limit", type=int, default=None, help="rows per task, drawn as load_task(limit, seed) (default: all)")
    ap.add_argument("--seed", type=int, default=0, help="row-selection seed (with --limit)")
    ap.add_argument("--max-batch-size", type=int, default=64, help="lm-eval's max_batch_size for batch_size=auto (its default 64)")
    ap.add_argument("--warmup", type=int, default=32, help="rows of each tool's untimed warm-up run (0: none)")
    ap.add_argument("--order", default="lm_eval,declens", help="which tool runs first on each task")
    ap.add_argument("--fastpath", default="auto", choices=FASTPATH_MODES,
                    help="declens' lean decoder loop: auto, off or compile (its best setting, as lm-eval gets batch auto)")
    ap.add_argument("--tiny", action="store_true", help="tiny random Llama on the CPU (smoke test)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for gpu_lmeval.json")
    args = ap.parse_args(argv)
    tasks = args.tasks.split(",")
    bad = [t for t in tasks if t not in TASKS]
    if bad or set(args.order.split(",")) != {"lm_eval", "declens"}:
        ap.error(f"--tasks must be from {', '.join(TASKS)} and --order name lm_eval and declens, got {args.tasks} / {args.order}")
    import lm_eval
    import transformers
    from transformers import AutoTokenizer

    _quiet()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    stock = StockTasks.load()  # lm-eval's TaskManager over the stock folders (untimed, both tools' setup)
    t = time.perf_counter()
    model = build(LLAMA3_8B, device, args.tiny)
    sync()
    lm = LoadedModel(model=model, tokenizer=tok, spec="llama3-8b-random" + ("-tiny" if args.tiny else ""),
                     source={"kind": "random-config", "shape": "llama3-8b", "tiny": args.tiny})
    lm.options = ExecutionOptions(fastpath=args.fastpath)
    report = {"env": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                      "torch": torch.__version__, "transformers": transformers.__version__, "lm_eval": lm_eval.__version__,
                      "dtype": str(next(model.parameters()).dtype), "model_build_s": round(time.perf_counter() - t, 2),
                      "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())},
              "config": {k: v for k, v in vars(args).items()}, "tasks": {}}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gpu_lmeval.json")
    for task in tasks:
        split, fmt = TASKS[task]
        n_split = len(stock.split_docs(task, split))
        idx = subsample(n_split, args.limit, args.seed)
        if args.warmup:
            widx = subsample(n_split, min(args.warmup, n_split), args.seed + 1)
            run_lmeval(model, tok, stock, task, widx, args.max_batch_size)
            analyze(lm, load_task(task, split=split, limit=args.warmup, seed=args.seed + 1), fmt, LAST,
                    progress=False, plots=False)
        runs: dict = {}
        data = None
        for tool in args.order.split(","):
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            if tool == "lm_eval":
                runs[tool] = run_lmeval(model, tok, stock, task, idx, args.max_batch_size)
            else:
                runs[tool], data = run_declens(lm, task, args.limit, args.seed)
            runs[tool].extra["peak_mem_gib"] = (round(torch.cuda.max_memory_allocated() / 2**30, 2)
                                                if device.type == "cuda" else None)
            print(f"{task}: {tool} {runs[tool].seconds:.1f} s", flush=True)
        every = read_split(get_spec(task), split)  # lm-eval read rows idx of the same file: same rows?
        if [it.id for it in data.items] != [every[i].id for i in idx]:
            raise SystemExit(f"{task}: declens selected other rows than lm-eval ({len(data.items)} vs {len(idx)})")
        row = {"split": split, "format": fmt, "rows": len(idx),
               "lm_eval_s": round(runs["lm_eval"].seconds, 2), "declens_s": round(runs["declens"].seconds, 2),
               "speedup_declens_vs_lm_eval": round(runs["lm_eval"].seconds / runs["declens"].seconds, 2),
               "lm_eval": runs["lm_eval"].extra, "declens": runs["declens"].extra,
               **compare(task, data, runs["lm_eval"], runs["declens"], args.seed)}
        report["tasks"][task] = row
        with open(path, "w") as f:  # rewritten after every task: a cut run keeps the finished ones
            json.dump(report, f, indent=1)
        a = row["acc"]
        print(f"{task}: {row['rows']} rows | lm-eval {row['lm_eval_s']} s | declens {row['declens_s']} s | "
              f"{row['speedup_declens_vs_lm_eval']}x | acc {a['lm_eval']:.4f} / {a['declens']:.4f} | answers agree "
              f"{a['agree']}/{row['rows']} (near ties {a['disagree_near_tie']}, unexplained {a['disagree_unexplained']}) | "
              f"prompts identical {row['prompt_strings_identical']}/{row['rows']}", flush=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
