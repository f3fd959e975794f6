"""GPU benchmark: dense layer-wise analysis and a full Iterative Pruning run on real model shapes.

Builds Llama-3-8B- and Qwen3-4B-shaped models with random weights directly on the GPU (bf16), uses
real token ids from a shipped tokenizer (SmolLM2's; its ids fit both vocabularies) on the full
ARC-Challenge test split (1172 questions, letter format), and measures, in one process:

1. peers: a bare transformers forward over all prompts (batches of 32 sorted by length), and a
   naive lens (``output_hidden_states`` + LM head at the last position of every layer);
2. declens' dense analysis end to end (tokenization, batching, all-layer lens, metrics), and its
   model FLOP utilisation against the bf16 matrix-product rate measured here;
3. a full Iterative Pruning run to 50%: Block Influence on 256 calibration prompts (drawn from the
   evaluated rows, as the paper's 256 ARC-Challenge samples) and a full evaluation after every step,
   replaying the removal order of the paper's table for that model (random weights make BI's own
   choice arbitrary), with and without prefix reuse.

Run on the device machine (see BENCHMARKS.md), e.g.::

    PYTHONPATH=src python benchmarks/gpu_bench.py --tokenizer .carry/smollm2-tokenizer --out $OUT

``--tiny`` runs the same code on tiny configs (CPU smoke test).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from declens.analyses.decision import AnalyzeConfig, analyze, encoder_for, prepare, score  # noqa: E402
from declens.execution import ExecutionOptions  # noqa: E402
from declens.models import LoadedModel  # noqa: E402
from declens.pruning import PruneConfig, prune  # noqa: E402
from declens.runner import collate, plan_batches  # noqa: E402
from declens.tasks import load_task  # noqa: E402

LLAMA3_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)
QWEN3_4B = dict(model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643,
                eos_token_id=151645)
# removal orders of the 50% rows of the paper's Table 2 (Llama3-8B) and Table 4 (Qwen3-4B)
ORDERS = {
    "llama3-8b": [24, 23, 25, 26, 27, 28, 22, 21, 19, 20, 18, 17, 10, 2, 11, 9],
    "qwen3-4b": [32, 31, 30, 2, 29, 26, 1, 28, 27, 25, 24, 20, 19, 7, 18, 8, 17, 21],
}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(shape: dict, device, tiny: bool):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(shape)
    mt = kw.pop("model_type")
    if tiny:
        kw.update(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
        if "head_dim" in kw:
            kw["head_dim"] = 32
    cfg = AutoConfig.for_model(mt, **kw)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa").eval()
    return model


def matmul_peak(device) -> float:
    if device.type != "cuda":
        return float("nan")
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    return 2 * n**3 * 10 / (time.perf_counter() - t)


def flops_per_token(cfg, n_ctx: float) -> float:
    """Forward FLOPs per token: 2 x (non-embedding matmul parameters) + attention scores/values."""
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    q = cfg.num_attention_heads * hd
    kv = cfg.num_key_value_heads * hd
    per_layer = 2 * (d * q + 2 * d * kv + q * d + 3 * d * f) + 2 * 2 * q * n_ctx / 2  # causal: half the context
    return L * per_layer


def bare_forward(lm, prompts, pad, batch=32):
    plan = plan_batches([len(p) for p in prompts], max_tokens=10**9, max_batch=batch)
    batches = [collate(prompts, idx, pad, lm.device) for idx in plan]
    masks = []
    for b in batches:  # what a user of plain transformers passes: a padding mask
        m = torch.arange(b.input_ids.shape[1], device=lm.device)[None] < b.lengths[:, None]
        masks.append(m.long())
    sync()
    t = time.perf_counter()
    with torch.inference_mode():
        for b, m in zip(batches, masks):
            lm.model.model(input_ids=b.input_ids, attention_mask=m)
    sync()
    return time.perf_counter() - t


def naive_lens(lm, prompts, pad, option_ids, batch=32):
    parts = lm.parts
    plan = plan_batches([len(p) for p in prompts], max_tokens=10**9, max_batch=batch)
    batches = [collate(prompts, idx, pad, lm.device) for idx in plan]
    sync()
    t = time.perf_counter()
    outs = []
    with torch.inference_mode():
        for b in batches:
            m = (torch.arange(b.input_ids.shape[1], device=lm.device)[None] < b.lengths[:, None]).long()
            hs = lm.model(input_ids=b.input_ids, attention_mask=m, output_hidden_states=True, logits_to_keep=1).hidden_states
            rows = torch.arange(b.size, device=lm.device)
            last = b.lengths - 1
            per = []
            for layer in range(1, len(hs)):
                h = hs[layer][rows, last]
                h = h if layer == len(hs) - 1 else parts.norm(h)
                per.append(parts.head(h)[:, option_ids].float())
            outs.append(torch.stack(per).cpu())
    sync()
    return time.perf_counter() - t


def run_model(name, shape, args, device, tok, peak):
    data = load_task("arc_challenge", split="test", limit=args.limit, seed=0)
    model = build(shape, device, args.tiny)
    lm = LoadedModel(model=model, tokenizer=tok, spec=f"{name}-random", source={"kind": "random-config", "shape": name})
    cfg = model.config
    enc = encoder_for(lm)
    req = prepare(lm, data, "letter")
    n_tok = sum(len(p) for p in req.prompts)
    mean_len = n_tok / len(req.prompts)
    fpt = flops_per_token(cfg, mean_len)
    total_flops = fpt * n_tok
    row = {"model": name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "questions": len(req.prompts), "tokens": n_tok, "mean_prompt_tokens": round(mean_len, 1),
           "forward_tflop": round(total_flops / 1e12, 1), "floor_s_at_peak": round(total_flops / peak, 3) if peak == peak else None}
    # warm-up: kernels, allocator, cuBLAS handles
    small = load_task("arc_challenge", limit=64, seed=1)
    analyze(lm, small, "letter", progress=False)
    bare_forward(lm, prepare(lm, small, "letter").prompts, enc.pad_id)

    row["bare_forward_s"] = round(min(bare_forward(lm, req.prompts, enc.pad_id) for _ in range(2)), 3)
    row["naive_lens_s"] = round(min(naive_lens(lm, req.prompts, enc.pad_id, req.option_ids) for _ in range(2)), 3)
    variants = [("generic-64k-c1024", ExecutionOptions(fastpath="off", batch_cost=1024), 65536)]
    variants += [(f"fast-{mt // 1024}k-c{c}", ExecutionOptions(fastpath="auto", batch_cost=c), mt)
                 for mt, c in ((32768, 256), (65536, 512))]
    if args.compile:
        variants += [(f"compile-{mt // 1024}k-c{c}", ExecutionOptions(fastpath="compile", batch_cost=c), mt)
                     for mt, c in ((32768, 256), (65536, 512))]
    if args.only:
        variants = [v for v in variants if v[0] in args.only.split(",")]
    best = None
    row["variants"] = {}
    for vname, options, mt in variants:
        lm.options = options
        sync()
        t = time.perf_counter()
        res = analyze(lm, data, "letter", AnalyzeConfig(max_tokens=mt), progress=False)  # first call: includes any compilation
        sync()
        first = time.perf_counter() - t
        times = []
        for _ in range(args.repeats):
            sync()
            t = time.perf_counter()
            res = analyze(lm, data, "letter", AnalyzeConfig(max_tokens=mt), progress=False)
            sync()
            times.append(time.perf_counter() - t)
        sync()
        t = time.perf_counter()
        r2 = prepare(lm, data, "letter")
        t_prep = time.perf_counter() - t
        t = time.perf_counter()
        score(lm, r2, max_tokens=mt)
        sync()
        t_score = time.perf_counter() - t
        v = {"first_s": round(first, 3), "best_s": round(min(times), 3), "all_s": [round(x, 3) for x in times],
             "prepare_s": round(t_prep, 3), "score_only_s": round(t_score, 3),
             "mfu": round(total_flops / min(times) / peak, 3) if peak == peak else None,
             "final_acc": res.metrics.final_acc, "final_dm": float(res.metrics.final_dm)}
        row["variants"][vname] = v
        print(name, vname, json.dumps(v), flush=True)
        if best is None or v["best_s"] < row["variants"][best[0]]["best_s"]:
            best = (vname, options, mt)
    row["best_variant"] = best[0]
    lm.options = best[1]
    row["declens_dense_s"] = row["variants"][best[0]]["best_s"]
    row["declens_mfu"] = row["variants"][best[0]]["mfu"]
    row["bare_forward_mfu"] = round(total_flops / row["bare_forward_s"] / peak, 3) if peak == peak else None
    if args.profile and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            analyze(lm, data, "letter", AnalyzeConfig(max_tokens=best[2]), progress=False)
            sync()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        with open(os.path.join(args.out, f"profile_{name}.txt"), "w") as f:
            f.write(table)
        print(table[:6000], flush=True)
    order = ORDERS[name]
    k = len(order)
    for reuse in [] if args.skip_ip else ([True, False] if name in args.no_reuse_models.split(",") else [True]):
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
        sync()
        t = time.perf_counter()
        pr = prune(lm, data, "letter", PruneConfig(["replay"], order=order, max_ratio=k / cfg.num_hidden_layers,
                                                   calib_samples=256, calib_from_eval=True, reuse=reuse,
                                                   max_tokens=best[2]), progress=False, plots=False)
        sync()
        key = "ip_replay_s" if reuse else "ip_replay_no_reuse_s"
        row[key] = round(time.perf_counter() - t, 3)
        if reuse:
            row["ip_steps"] = k
            row["ip_share_of_work_saved"] = pr.work["share_saved"]
            row["ip_final_acc_by_step"] = [round(r.final_accuracy, 4) for r in pr.runs["replay"].records]
            row["ip_bi_measured_every_step"] = all(r.bi is not None for r in pr.runs["replay"].records)
    del lm, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=".carry/smollm2-tokenizer")
    ap.add_argument("--models", default="llama3-8b,qwen3-4b")
    ap.add_argument("--limit", type=int, default=None, help="ARC-Challenge rows (default: all 1172)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-reuse-models", default="", help="models whose IP run is also timed without prefix reuse")
    ap.add_argument("--tiny", action="store_true", help="tiny configs (CPU smoke test)")
    ap.add_argument("--compile", action="store_true", help="also time the torch.compile variant of the fast path")
    ap.add_argument("--profile", action="store_true", help="write a torch profiler table of the best variant")
    ap.add_argument("--only", default=None, help="comma-separated variant names to run (default: all)")
    ap.add_argument("--skip-ip", action="store_true", help="skip the Iterative Pruning runs")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    from transformers import AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    peak = matmul_peak(device)
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "matmul_peak_tflops": round(peak / 1e12, 1)}
    print(json.dumps(env), flush=True)
    rows = []
    for name in args.models.split(","):
        shape = {"llama3-8b": LLAMA3_8B, "qwen3-4b": QWEN3_4B}[name]
        row = run_model(name, shape, args, device, tok, peak)
        print(json.dumps(row), flush=True)
        rows.append(row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=2)
    print("\nmodel       | bare fwd s | naive lens s | declens dense s | MFU  | IP 50% s | no-reuse s | work saved")
    for r in rows:
        print(f"{r['model']:<11} | {r['bare_forward_s']:>10} | {r['naive_lens_s']:>12} | {r['declens_dense_s']:>15} | "
              f"{r['declens_mfu']} | {r.get('ip_replay_s', '-'):>8} | {r.get('ip_replay_no_reuse_s', '-'):>10} | {r.get('ip_share_of_work_saved', '-')}")


if __name__ == "__main__":
    main()
