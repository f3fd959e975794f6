"""A Llama-3-70B-shaped model sharded over the GPUs of one host: dense analysis and Iterative Pruning.

Issue 12, target 4. The model has Llama-3-70B's exact shapes (vocabulary 128,256, hidden 8192,
intermediate 28,672, 80 layers, 64 heads, 8 key/value heads, rope theta 500,000, untied head:
70.55 B parameters, 141 GB in bf16) and random weights. It is placed the way ``declens
--device-map auto`` places a checkpoint, without ever existing on the CPU:

1. the modules are built on the meta device (accelerate's ``init_empty_weights``; the small rotary
   buffers stay real);
2. the device map comes from transformers' own ``_get_device_map(model, "auto", max_memory, None)``,
   the function ``from_pretrained(device_map="auto")`` calls (balanced memory, no split inside a
   decoder layer, no memory cap unless ``--max-memory`` is given);
3. every parameter is drawn straight on its GPU (``normal(0, --std)`` for matrices, ones for norm
   weights, zeros for biases; one generator per parameter seeded with ``--seed`` and the parameter's
   index, so the weights do not depend on the placement);
4. transformers' ``accelerate_dispatch`` attaches accelerate's device hooks exactly as
   ``from_pretrained`` does (on the CPU, with ``--tiny``, the same hooks are forced onto a one-device map),
   and the model is wrapped in the :class:`~declens.models.LoadedModel` that ``load_model`` returns.

Then, timed one after the other, with the peak memory of every GPU (``max_memory_allocated``):
the dense letter analysis of ARC-Challenge (all 1172 test rows, every layer through the lens), and
four Iterative Pruning steps by Block Influence on 64 calibration rows (the paper gives no removal
order for Llama-3-70B, so no replay: BI picks the layers, as ``declens prune --method ip``). Every
stage is written to ``<out>/gpu_shard70b.json`` as soon as it ends (a run cut short keeps what it did).

GPU (device tool, kind ``nvidia-h200-x2``, carry ``[".carry/smollm2-tokenizer"]``)::

    PYTHONPATH=src python3 benchmarks/gpu_shard70b.py --tokenizer .carry/smollm2-tokenizer --out $OUT

CPU smoke test (a tiny 16-layer Llama, the same code, accelerate's hooks forced on a CPU-only map)::

    python benchmarks/gpu_shard70b.py --tiny --out /tmp/shard70b
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # before CUDA starts: less fragmentation

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
sys.path.insert(0, os.path.dirname(__file__))

from gpu_bench import flops_per_token, matmul_peak

from declens.analyses.decision import AnalyzeConfig, analyze, prepare
from declens.models import LoadedModel
from declens.pruning import PruneConfig, PruningEngine, prune
from declens.tasks import load_task

#: Llama-3-70B's config (meta-llama/Meta-Llama-3-70B config.json)
LLAMA3_70B = dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                  num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.02, bos_token_id=128000,
                  eos_token_id=128001)
#: ``--tiny``: the same vocabulary and grouped-query layout, 16 narrow layers (a CPU smoke test)
TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=16)


@dataclass
class BuildConfig:
    """How the random sharded model is built.

    Attributes:
        shape: transformers config keys (with ``model_type``).
        device_map: accelerate placement strategy (``auto``, ``balanced``, ``sequential`` ...).
        max_memory: per-GPU cap (``"60GiB"``) or None for none (all free memory, as ``from_pretrained``).
        seed: base seed of the per-parameter generators.
        std: standard deviation of the matrices' normal init.
        dtype: parameter dtype.
    """

    shape: dict
    device_map: str = "auto"
    max_memory: str | None = None
    seed: int = 0
    std: float = 0.02
    dtype: torch.dtype = torch.bfloat16


def gpus() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def sync_all() -> None:
    for d in gpus():
        torch.cuda.synchronize(d)


def memory_by_gpu(peak: bool) -> dict[str, float]:
    """GiB allocated (or the peak since the last reset) on every GPU."""
    f = torch.cuda.max_memory_allocated if peak else torch.cuda.memory_allocated
    return {f"cuda:{d}": round(f(d) / 2**30, 2) for d in gpus()}


class Report:
    """The JSON result file, rewritten (atomically) after every stage."""

    def __init__(self, path: str, head: dict):
        self.path = path
        self.data = {**head, "stages": {}}
        self.flush()

    def flush(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=2, default=str)
        os.replace(tmp, self.path)

    @contextmanager
    def stage(self, name: str):
        """Time a stage (all GPUs synchronised) and record its per-GPU peak memory; flush at its end.

        A stage that raises is recorded with its error before the error propagates.
        """
        for d in gpus():
            torch.cuda.reset_peak_memory_stats(d)
        rec: dict = {}
        self.data["stages"][name] = rec
        sync_all()
        t0 = time.perf_counter()
        try:
            yield rec
        except BaseException as e:
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            raise
        finally:
            sync_all()
            rec["s"] = round(time.perf_counter() - t0, 3)
            rec["peak_gib"] = memory_by_gpu(peak=True)
            rec["peak_reserved_gib"] = {f"cuda:{d}": round(torch.cuda.max_memory_reserved(d) / 2**30, 2) for d in gpus()}
            rec["allocated_gib_after"] = memory_by_gpu(peak=False)
            self.flush()
            print(name, json.dumps(rec, default=str)[:2000], flush=True)


def _device_of(name: str, device_map: dict) -> torch.device:
    """The device of parameter ``name`` under an accelerate device map (longest module-prefix match)."""
    best = None
    for key in device_map:
        if (key == "" or name == key or name.startswith(key + ".")) and (best is None or len(key) > len(best)):
            best = key
    dev = device_map[best] if best is not None else "cpu"
    return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)


def materialise(model: torch.nn.Module, device_map: dict, seed: int, std: float) -> dict[str, int]:
    """Replace every meta parameter by a tensor drawn directly on its mapped device.

    Matrices (``dim >= 2``, embeddings included): ``normal(0, std)``; 1-D ``bias``: zeros; other 1-D
    weights (norms): ones. Parameter ``i`` (in ``named_parameters`` order) uses its own generator
    seeded with ``seed * 1_000_003 + i``, on its device.

    Returns:
        bytes of parameters per device.
    """
    per_dev: dict[str, int] = {}
    with torch.no_grad():
        for i, (name, p) in enumerate(list(model.named_parameters())):
            dev = _device_of(name, device_map)
            if p.dim() >= 2:
                g = torch.Generator(device=dev).manual_seed(seed * 1_000_003 + i)
                t = torch.empty(p.shape, dtype=p.dtype, device=dev).normal_(0.0, std, generator=g)
            elif name.endswith("bias"):
                t = torch.zeros(p.shape, dtype=p.dtype, device=dev)
            else:
                t = torch.ones(p.shape, dtype=p.dtype, device=dev)
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
            per_dev[str(dev)] = per_dev.get(str(dev), 0) + t.numel() * t.element_size()
    return per_dev


def build_sharded(cfg: BuildConfig, rec: dict) -> torch.nn.Module:
    """A random model placed as ``from_pretrained(device_map=cfg.device_map)`` places a checkpoint.

    Nothing of the weights is ever allocated on the CPU (on a GPU host). Sub-step times and the
    placement go into ``rec``.
    """
    from accelerate import dispatch_model, init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.accelerate import _get_device_map, accelerate_dispatch  # what from_pretrained uses

    kw = dict(cfg.shape)
    config = AutoConfig.for_model(kw.pop("model_type"), **kw)
    t = time.perf_counter()
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=cfg.dtype, attn_implementation="sdpa")
    rec["meta_init_s"] = round(time.perf_counter() - t, 3)
    rec["parameters"] = sum(p.numel() for p in model.parameters())
    max_memory = {d: cfg.max_memory for d in gpus()} if cfg.max_memory else None
    t = time.perf_counter()
    device_map = _get_device_map(model, cfg.device_map, max_memory, None)
    rec["device_map_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    per_dev = materialise(model, device_map, cfg.seed, cfg.std)
    sync_all()
    rec["materialise_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    if len(set(device_map.values())) > 1:  # what from_pretrained does with a multi-device map
        accelerate_dispatch(model, None, device_map, None, None, False)
    else:  # one device (the CPU smoke test): force the same hooks, so the same (hooked, generic) path runs
        dispatch_model(model, device_map=device_map, force_hooks=True)
    model.eval()
    rec["dispatch_s"] = round(time.perf_counter() - t, 3)
    modules: dict[str, list[str]] = {}
    for key in device_map:
        modules.setdefault(str(_device_of(key, device_map)), []).append(key)
    rec["placement"] = {dev: {"modules": len(keys), "first": keys[0], "last": keys[-1],
                              "param_gib": round(per_dev.get(dev, 0) / 2**30, 2)} for dev, keys in modules.items()}
    rec["device_map_policy"] = (f"transformers _get_device_map({cfg.device_map!r}, max_memory="
                                f"{max_memory or 'None (all free memory)'}) + accelerate_dispatch, as from_pretrained")
    return model


@contextmanager
def step_timer(rep: Report, rec: dict):
    """Time every :meth:`PruningEngine.evaluate` call (the dense pass and each pruning step) and flush it.

    A wrapper around the engine's own method for the duration of the run: the engine computes as always.
    """
    orig = PruningEngine.evaluate
    steps = rec.setdefault("evaluations", [])

    def timed(self, removed, *args, **kwargs):
        for d in gpus():
            torch.cuda.reset_peak_memory_stats(d)
        sync_all()
        t = time.perf_counter()
        ev = orig(self, removed, *args, **kwargs)
        sync_all()
        steps.append({"removed": list(removed), "s": round(time.perf_counter() - t, 3),
                      "peak_gib": memory_by_gpu(peak=True), "accuracy": ev.metrics.final_acc if ev.metrics else None})
        rep.flush()
        return ev

    PruningEngine.evaluate = timed
    try:
        yield
    finally:
        PruningEngine.evaluate = orig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=".carry/smollm2-tokenizer")
    ap.add_argument("--limit", type=int, default=None, help="ARC-Challenge test rows (default: all 1172; --tiny: 100)")
    ap.add_argument("--ip-steps", type=int, default=4, help="Iterative Pruning steps (layers removed)")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-from-eval", action="store_true",
                    help="calibrate on evaluated rows (BI from the evaluation pass) instead of the ARC-Challenge train split")
    ap.add_argument("--max-tokens", type=int, default=32768, help="padded tokens per batch")
    ap.add_argument("--device-map", default="auto")
    ap.add_argument("--max-memory", default=None, help="per-GPU cap (default: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-ip", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny Llama on the CPU, same code (smoke test)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    import accelerate
    import transformers
    from transformers import AutoTokenizer

    on_gpu = bool(gpus()) and not a.tiny
    if a.tiny:
        torch.set_num_threads(1)  # tiny matrices gain nothing from threads, and lose much on a shared CPU
    if not on_gpu and not a.tiny:
        raise SystemExit("no GPU visible: run with --tiny on the CPU, or on a GPU host")
    shape = {**LLAMA3_70B, **(TINY if a.tiny else {})}
    limit = a.limit if a.limit is not None else (100 if a.tiny else None)
    bcfg = BuildConfig(shape=shape, device_map=a.device_map, max_memory=a.max_memory, seed=a.seed,
                       dtype=torch.bfloat16 if on_gpu else torch.float32)
    peak = matmul_peak(torch.device("cuda", 0)) if on_gpu else None
    if on_gpu:
        torch.cuda.empty_cache()  # the device map sees all free memory, as in a fresh process
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "accelerate": accelerate.__version__,
           "python": platform.python_version(), "gpus": [torch.cuda.get_device_name(d) for d in gpus()],
           "gpu_total_gib": [round(torch.cuda.get_device_properties(d).total_memory / 2**30, 1) for d in gpus()],
           "gpu_free_gib_before_build": [round(torch.cuda.mem_get_info(d)[0] / 2**30, 1) for d in gpus()],
           "matmul_peak_tflops_cuda0": round(peak / 1e12, 1) if peak else None,
           "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    config = {**{k: v for k, v in asdict(bcfg).items() if k != "dtype"}, "dtype": str(bcfg.dtype).replace("torch.", ""),
              "task": "arc_challenge", "split": "test", "limit": limit, "format": "letter", "lens_layers": "all",
              "max_tokens": a.max_tokens, "ip": {"method": "ip (Block Influence; no paper order for Llama-3-70B)",
                                                  "steps": a.ip_steps, "calib_samples": a.calib_samples,
                                                  "calib": "evaluated rows" if a.calib_from_eval else "arc_challenge train split",
                                                  "reuse": True, "skip_prun": False},
              "tiny": a.tiny, "tokenizer": a.tokenizer}
    rep = Report(os.path.join(a.out, "gpu_shard70b.json"), {"config": config, "env": env})
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    data = load_task("arc_challenge", split="test", limit=limit, seed=0)

    with rep.stage("build") as rec:
        model = build_sharded(bcfg, rec)
        lm = LoadedModel(model=model, tokenizer=tok, spec="llama3-70b-random" + ("-tiny" if a.tiny else ""),
                         source={"kind": "random-config", "shape": "llama3-70b", "init": f"normal(0, {bcfg.std}), seed {bcfg.seed}",
                                 "device_map": a.device_map, "max_memory": a.max_memory})
        rec["num_layers"] = lm.num_layers
        rec["head_device"] = str(lm.device)
        rec["hooked"] = bool(getattr(model, "hf_device_map", None))
    L = lm.num_layers
    with rep.stage("prepare") as rec:
        req = prepare(lm, data, "letter")
        n_tok = sum(len(p) for p in req.prompts)
        flops = flops_per_token(model.config, n_tok / len(req.prompts)) * n_tok
        rec.update(questions=len(req.prompts), tokens=n_tok, forward_pflop=round(flops / 1e15, 3),
                   floor_s_one_gpu_at_peak=round(flops / peak, 2) if peak else None)
    with rep.stage("warmup_64_rows"):
        analyze(lm, load_task("arc_challenge", limit=64, seed=1), "letter", AnalyzeConfig(max_tokens=a.max_tokens),
                progress=False, plots=False)
    with rep.stage("analysis") as rec:
        res = analyze(lm, data, "letter", AnalyzeConfig(max_tokens=a.max_tokens), progress=False, plots=False)
        sync_all()
        rec["layers_read"] = int(res.scores.scores.shape[0])
        rec["final_acc"] = res.metrics.final_acc
        rec["final_dm"] = float(res.metrics.final_dm)
    an = rep.data["stages"]["analysis"]
    if peak:  # a sharded forward runs one GPU at a time: utilisation against one GPU's peak
        an["mfu_one_gpu"] = round(flops / an["s"] / peak, 3)
    rep.flush()
    if a.skip_ip:
        return
    with rep.stage("iterative_pruning") as rec, step_timer(rep, rec):
        pr = prune(lm, data, "letter", PruneConfig(["ip"], max_ratio=a.ip_steps / L, calib_samples=a.calib_samples,
                                                   calib_from_eval=a.calib_from_eval, max_tokens=a.max_tokens),
                   progress=False, plots=False)
        recs = pr.runs["ip"].records
        rec["removed_order"] = [r.layer for r in recs if r.layer is not None]
        rec["accuracy_by_step"] = [round(r.final_accuracy, 4) for r in recs]
        rec["final_dm_by_step"] = [round(float(r.final_dm), 4) for r in recs]
        rec["work"] = pr.work
        rec["prune_s_internal"] = pr.provenance["timing"]["prune_s"]
        rec["model_fingerprint"] = pr.provenance["model"].get("fingerprint")


if __name__ == "__main__":
    main()
