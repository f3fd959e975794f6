"""declens against lm-evaluation-harness: same model, same rows, same prompts, side by side.

For each task (ARC-Easy, PIQA, HellaSwag) this script

1. selects rows with ``declens.tasks.load_task(task, limit=N, seed=S)`` and writes those rows, as
   the raw records declens reads from its bundled data, to ``<work>/data/<task>.jsonl``;
2. writes an lm-eval task YAML (``<work>/tasks/``, passed with ``--include_path``) that reads that
   JSONL through ``dataset_path: json`` and is lm-eval's own stock task definition otherwise
   (``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target``, default ``target_delimiter`` " ",
   metrics ``acc`` and ``acc_norm``; HellaSwag cleans with lm-eval's own ``preprocess``), so the
   prompt strings are declens' cloze prompts (checked row by row below);
3. times the WHOLE command of each tool as a subprocess (wall clock, imports and model load
   included): ``lm_eval --model hf ... --log_samples`` from the lm-eval interpreter (``--python``)
   and ``declens analyze --format cloze --dtype float32 --lens-layers last`` on the registered task
   with the same ``--limit``/``--seed`` (identical rows: the item ids are checked);
4. compares ``acc`` and ``acc_norm`` and every row's choice (lm-eval's logged samples against
   declens' ``result.json`` samples), classifying every disagreement;
5. prints a table and writes it as JSON (``--out``).

``acc_norm``: both tools divide an option's log-likelihood by ``len(choice)`` (the choice text,
without the target delimiter " "), so ``acc_norm`` choices are compared directly too.

Usage (from the repository root, project venv active; lm-eval in its own venv):

    python benchmarks/bench_lmeval.py --limit 200 --python /work/lmeval-venv/bin/python
"""

from __future__ import annotations

import argparse
import glob
import inspect
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import declens
from declens.formats import Encoder, cloze_pairs
from declens.tasks import _SENTENCE_END, _bundled, _read_records, _records_to_items, get_spec, hellaswag_split_context
from declens.tasks import load_task, subsample

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = Path(os.environ.get("DECLENS_CACHE", "~/.cache/declens")).expanduser() / "presets" / "smollm2-135m"
TASKS = ("arc_easy", "piqa", "hellaswag")

# lm-eval task definitions: lm-eval's stock arc_easy / piqa / hellaswag YAMLs with local data.
# ``{task}`` and ``{data}`` are filled in; everything else is lm-eval's own definition.
YAML = {
    "arc_easy": """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "piqa": """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "hellaswag": """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
process_docs: !function declens_bench_utils.process_hellaswag
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "choices"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
}

# HellaSwag: lm-eval's own stock ``process_docs`` (``preprocess(activity_label + ": " + ctx_a + " " +
# ctx_b.capitalize())``). declens' bundled rows carry ``ctx`` only; ``ctx_a``/``ctx_b`` are recovered
# with declens' ``hellaswag_split_context`` (its source is copied into the generated file, since the
# lm-eval interpreter need not have declens installed), as declens does (docs/METHOD.md).
UTILS = f'''\
import re

from lm_eval.tasks.hellaswag.utils import process_docs

_SENTENCE_END = re.compile({_SENTENCE_END.pattern!r})


{inspect.getsource(hellaswag_split_context)}

def process_hellaswag(dataset):
    def _split(doc):
        ctx_a, ctx_b = hellaswag_split_context(doc["ctx"])
        return {{"ctx_a": ctx_a, "ctx_b": ctx_b}}

    return process_docs(dataset.map(_split))
'''


# ---------------------------------------------------------------------------------------------
# Data and task files


def selected_records(task: str, limit: int, seed: int):
    """The raw records declens selects for ``load_task(task, limit, seed)``, and its items.

    Replays load_task's selection on the raw bundled rows and checks that the records map to
    exactly the items load_task returns (same ids, texts, gold), in the same order.
    """
    spec = get_spec(task)
    data = load_task(task, limit=limit, seed=seed)
    location = spec.splits[data.split]
    records = _read_records(_bundled(location), location)
    idx = subsample(len(records), limit, seed)
    chosen = [records[i] for i in idx]
    all_items = _records_to_items(records, spec.fields, data.split, location, spec.preprocess, spec.process_docs)
    items = [all_items[i] for i in idx]
    for i, (a, b) in enumerate(zip(items, data.items)):
        same = (a.id, a.question, a.choices, a.gold) == (b.id, b.question, b.choices, b.gold)
        if not same:
            raise SystemExit(f"{task}: row {i} of the replayed selection differs from load_task's")
    if len(chosen) != len(data.items):
        raise SystemExit(f"{task}: {len(chosen)} replayed rows vs {len(data.items)} from load_task")
    return chosen, data


def write_task_files(work: Path, task: str, records: list[dict]) -> str:
    """Write the JSONL and the lm-eval YAML; returns the lm-eval task name."""
    (work / "data").mkdir(parents=True, exist_ok=True)
    (work / "tasks").mkdir(parents=True, exist_ok=True)
    data_path = work / "data" / f"{task}.jsonl"
    with open(data_path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    name = f"declens_bench_{task}"
    (work / "tasks" / f"{name}.yaml").write_text(YAML[task].format(task=name, data=json.dumps(str(data_path))))
    (work / "tasks" / "declens_bench_utils.py").write_text(UTILS)
    return name


# ---------------------------------------------------------------------------------------------
# Running and timing


def timed(cmd: list[str], log: Path, env: dict) -> dict:
    """Run a whole command; wall clock and the child's CPU time (user + sys)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(log.parent))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- {log} ---\n{tail}")
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "loadavg_1m_before": round(load, 2)}


def lmeval_command(args, task_name: str, work: Path, out: Path) -> list[str]:
    return [args.python, "-m", "lm_eval", "--model", "hf",
            "--model_args", f"pretrained={args.model},dtype=float32",
            "--tasks", task_name, "--include_path", str(work / "tasks"),
            "--batch_size", str(args.batch_size), "--device", "cpu",
            "--log_samples", "--output_path", str(out)]


def declens_command(args, task: str, out: Path) -> list[str]:
    return [args.declens, "analyze", "--model", str(args.model), "--task", task,
            "--limit", str(args.limit), "--seed", str(args.seed),
            "--format", "cloze", "--dtype", "float32", "--device", "cpu", "--lens-layers", "last",
            "--out", str(out), *args.declens_extra.split()]


def lmeval_compute_s(log: Path) -> float | None:
    """Seconds between lm-eval's "Running loglikelihood requests" and "Saving results" log lines
    (1 s resolution): its scoring time, the rest of its wall time being start-up and writing."""
    import datetime as dt

    stamps = {}
    for line in log.read_text(errors="replace").splitlines():
        for key, marker in (("run", "Running loglikelihood requests"), ("save", "Saving results")):
            if marker in line and key not in stamps and line[:4].isdigit():
                stamps[key] = dt.datetime.strptime(line.split()[0], "%Y-%m-%d:%H:%M:%S")
    if len(stamps) < 2:
        return None
    return (stamps["save"] - stamps["run"]).total_seconds()


def read_lmeval(out: Path, task_name: str) -> tuple[dict, list[dict]]:
    res = sorted(glob.glob(str(out / "**" / "results_*.json"), recursive=True))
    smp = sorted(glob.glob(str(out / "**" / f"samples_{task_name}_*.jsonl"), recursive=True))
    if not res or not smp:
        raise SystemExit(f"no lm-eval results/samples under {out}")
    results = json.loads(Path(res[-1]).read_text())["results"][task_name]
    # split on "\n" only: splitlines() would also split on U+2028 inside unescaped strings
    samples = [json.loads(line) for line in Path(smp[-1]).read_text(encoding="utf-8").split("\n") if line.strip()]
    samples.sort(key=lambda s: s["doc_id"])
    return results, samples


# ---------------------------------------------------------------------------------------------
# Comparison


def lmeval_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval 0.4.x HFLM._encode_pair for a causal model (tokenizer's default special tokens)."""
    n = len(context) - len(context.rstrip())
    if n:
        continuation = context[-n:] + continuation
        context = context[:-n]
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx):]


def compare(task: str, data, lm_samples: list[dict], dl: dict, tok) -> dict:
    spec = data.spec
    enc = Encoder(tok)
    dl_samples = dl["samples"]
    n = len(data.items)
    if len(lm_samples) != n or len(dl_samples) != n:
        raise SystemExit(f"{task}: {len(lm_samples)} lm-eval rows, {len(dl_samples)} declens rows, {n} selected")
    ids_ok = all(s["id"] == it.id for s, it in zip(dl_samples, data.items))
    prompt_diff, token_diff, rows = [], [], []
    max_abs = 0.0
    for i, (it, ls, ds) in enumerate(zip(data.items, lm_samples, dl_samples)):
        pairs = cloze_pairs(spec, it)
        # lm-eval 0.4.x logs {"gen_args_k": {"arg_0": context, "arg_1": continuation}} per option
        args_ = ls["arguments"]
        args_ = [args_[k] for k in sorted(args_, key=lambda k: int(k.rsplit("_", 1)[-1]))] if isinstance(args_, dict) else args_
        lm_args = [(a["arg_0"], a["arg_1"]) if isinstance(a, dict) else (a[0], a[1]) for a in args_]
        if lm_args != [tuple(p) for p in pairs]:
            prompt_diff.append({"row": i, "id": it.id, "lm_eval": lm_args[0], "declens": pairs[0]})
        for (c, x) in pairs:
            if lmeval_pair(tok, c, x) != enc.pair(c, x):
                token_diff.append({"row": i, "id": it.id, "context": c, "continuation": x})
        lm_ll = np.array([float(r[0]) for r in ls["filtered_resps"]], dtype=np.float64)
        dl_ll = np.array(ds["scores"], dtype=np.float64)
        max_abs = max(max_abs, float(np.max(np.abs(lm_ll - dl_ll))))
        n_chars = np.array([len(c) for c in it.choices], dtype=np.float64)  # len(choice): both tools
        rows.append({
            "id": it.id, "gold": it.gold, "lm_ll": lm_ll, "dl_ll": dl_ll,
            "lm_pred": int(np.argmax(lm_ll)), "dl_pred": int(ds["pred"]),
            "lm_pred_norm": int(np.argmax(lm_ll / n_chars)), "dl_pred_norm": int(ds["pred_norm"]),
            "lm_acc": float(ls["acc"]), "lm_acc_norm": float(ls["acc_norm"]),
            "n_chars": n_chars,
        })

    def gap(v):
        s = np.sort(v)[::-1]
        return float(s[0] - s[1])

    tol = max(10 * max_abs, 1e-4)
    diffs = []
    for r in rows:
        for kind, a, b in (("acc", r["lm_pred"], r["dl_pred"]), ("acc_norm", r["lm_pred_norm"], r["dl_pred_norm"])):
            if a == b:
                continue
            lm_v = r["lm_ll"] / (r["n_chars"] if kind == "acc_norm" else 1)
            dl_v = r["dl_ll"] / (r["n_chars"] if kind == "acc_norm" else 1)
            if min(gap(lm_v), gap(dl_v)) <= tol:
                why = f"near tie: top-two gap {min(gap(lm_v), gap(dl_v)):.2e} <= numeric difference {tol:.1e}"
            else:
                why = "UNEXPLAINED"
            diffs.append({"id": r["id"], "metric": kind, "gold": r["gold"], "lm_eval": a, "declens": b,
                          "lm_ll": [round(x, 5) for x in r["lm_ll"]], "declens_ll": [round(x, 5) for x in r["dl_ll"]],
                          "reason": why})
    mean = lambda k: float(np.mean([r[k] for r in rows]))  # noqa: E731
    gold = np.array([r["gold"] for r in rows])
    return {
        "rows": n,
        "row_ids_identical": ids_ok,
        "prompt_strings_identical": not prompt_diff,
        "prompt_differences": prompt_diff[:10],
        "token_ids_identical": not token_diff,
        "token_differences": token_diff[:10],
        "max_abs_loglik_diff": max_abs,
        "acc_lmeval": mean("lm_acc"),
        "acc_declens": float(np.mean([r["dl_pred"] == g for r, g in zip(rows, gold)])),
        "acc_norm_lmeval": mean("lm_acc_norm"),
        "acc_norm_declens": float(np.mean([r["dl_pred_norm"] == g for r, g in zip(rows, gold)])),
        "agree_pred": float(np.mean([r["lm_pred"] == r["dl_pred"] for r in rows])),
        "agree_pred_norm": float(np.mean([r["lm_pred_norm"] == r["dl_pred_norm"] for r in rows])),
        "disagreements": diffs,
    }


# ---------------------------------------------------------------------------------------------


def _s(v) -> str:
    return "?" if v is None else f"{v:.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=200, help="rows per task (default 200)")
    ap.add_argument("--seed", type=int, default=0, help="row-selection seed (default 0)")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    ap.add_argument("--batch-size", type=int, default=8, help="lm-eval --batch_size (default 8)")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF model directory both tools load")
    ap.add_argument("--python", default="/work/lmeval-venv/bin/python", help="interpreter with lm_eval installed")
    ap.add_argument("--declens", default=str(Path(sys.executable).parent / "declens"),
                    help="the declens command (default: next to this interpreter)")
    ap.add_argument("--threads", type=int, default=None,
                    help="set OMP_NUM_THREADS/MKL_NUM_THREADS for both commands (default: unset, torch uses every core); "
                         "1 makes CPU seconds a load-robust measure of work on a shared machine")
    ap.add_argument("--declens-extra", default="", help="extra declens analyze options, written with =: --declens-extra=\"--max-tokens 1024\"")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench_lmeval", help="work folder (data, tasks, outputs, logs)")
    ap.add_argument("--out", type=Path, default=None,
                    help="result JSON (default benchmarks/results/lmeval_<model>_<limit>.json)")
    args = ap.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in TASKS:
            ap.error(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    args.model = args.model.expanduser().resolve()
    out_json = args.out or REPO / "benchmarks" / "results" / f"lmeval_{args.model.name}_{args.limit}.json"
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(work / "hf_datasets_cache"), TOKENIZERS_PARALLELISM="false")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    lm_version = subprocess.run([args.python, "-c", "import importlib.metadata as m; print(m.version('lm_eval'))"],
                                capture_output=True, text=True, env=env).stdout.strip()
    if not lm_version:
        raise SystemExit(f"{args.python} cannot import lm_eval; install it there (see benchmarks/LMEVAL_NOTES.md)")
    # Both commands read the same weights; pre-read them so neither pays the cold disk read.
    for f in args.model.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(args.model))
    report = {
        "model": str(args.model), "limit": args.limit, "seed": args.seed, "batch_size": args.batch_size,
        "threads": args.threads, "declens_extra": args.declens_extra,
        "versions": {"declens": declens.__version__, "lm_eval": lm_version, "python": platform.python_version()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "tasks": {},
    }
    for task in tasks:
        records, data = selected_records(task, args.limit, args.seed)
        name = write_task_files(work, task, records)
        lm_out, dl_out = work / "lmeval" / task, work / "declens" / task
        for p in (lm_out, dl_out):
            shutil.rmtree(p, ignore_errors=True)
            p.mkdir(parents=True)
        lm_cmd, dl_cmd = lmeval_command(args, name, work, lm_out), declens_command(args, task, dl_out)
        print(f"[{task}] lm-eval:  {' '.join(lm_cmd)}", flush=True)
        t_lm = timed(lm_cmd, lm_out / "log.txt", env)
        print(f"[{task}]   {t_lm}", flush=True)
        print(f"[{task}] declens:  {' '.join(dl_cmd)}", flush=True)
        t_dl = timed(dl_cmd, dl_out / "log.txt", env)
        print(f"[{task}]   {t_dl}", flush=True)
        lm_res, lm_samples = read_lmeval(lm_out, name)
        dl = json.loads((dl_out / "result.json").read_text())
        cmp_ = compare(task, data, lm_samples, dl, tok)
        cmp_["acc_lmeval_reported"] = lm_res.get("acc,none")
        cmp_["acc_norm_lmeval_reported"] = lm_res.get("acc_norm,none")
        cmp_["declens_fingerprint_matches"] = dl["provenance"]["data"]["fingerprint"] == data.fingerprint()
        report["tasks"][task] = {
            "lmeval": {**t_lm, "command": lm_cmd, "score_s": lmeval_compute_s(lm_out / "log.txt")},
            "declens": {**t_dl, "command": dl_cmd, "score_s": dl["provenance"]["timing"]["score_s"]},
            "speedup_wall": round(t_lm["wall_s"] / t_dl["wall_s"], 2),
            "speedup_cpu": round(t_lm["cpu_s"] / max(t_dl["cpu_s"], 1e-9), 2),
            **cmp_,
        }

    hdr = (f"{'task':<10} {'rows':>4} {'lm-eval s':>9} {'declens s':>9} {'ratio':>6} {'score s lm/dl':>13} {'acc lm/dl':>13} "
           f"{'acc_norm lm/dl':>14} {'agree':>6} {'agree_n':>7} {'prompts':>7}")
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for task, r in report["tasks"].items():
        print(f"{task:<10} {r['rows']:>4} {r['lmeval']['wall_s']:>9.1f} {r['declens']['wall_s']:>9.1f} "
              f"{r['speedup_wall']:>5.2f}x {_s(r['lmeval']['score_s']):>6}/{_s(r['declens']['score_s']):<6} "
              f"{r['acc_lmeval']:.3f}/{r['acc_declens']:.3f}  "
              f"{r['acc_norm_lmeval']:.3f}/{r['acc_norm_declens']:.3f}  {r['agree_pred']:>6.3f} "
              f"{r['agree_pred_norm']:>7.3f} "
              f"{'same' if r['prompt_strings_identical'] and r['token_ids_identical'] else 'DIFF':>7}")
    print("ratio: lm-eval wall / declens wall (whole commands); score s: scoring only (lm-eval from its log, 1 s "
          "resolution; declens from result.json); the rest of each wall time is start-up, model load and writing")
    print("agree: share of rows with the same acc choice; agree_n: the same acc_norm choice")
    for task, r in report["tasks"].items():
        print(f"{task}: max |loglik diff| {r['max_abs_loglik_diff']:.2e}; rows identical {r['row_ids_identical']}; "
              f"{len(r['disagreements'])} disagreement(s)")
        for d in r["disagreements"]:
            print(f"  {d['id']} {d['metric']}: lm-eval {d['lm_eval']} declens {d['declens']} (gold {d['gold']}): {d['reason']}")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=1, default=float) + "\n")
    print(f"\nwrote {out_json}")
    unexplained = sum(d["reason"] == "UNEXPLAINED" for r in report["tasks"].values() for d in r["disagreements"])
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
