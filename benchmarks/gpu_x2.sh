#!/usr/bin/env bash
# Issue 12, target 4, in one call on the device tool's `nvidia-h200-x2` (carry [".carry/smollm2-tokenizer"]):
#   1. gpu_shard70b.py: the Llama-3-70B-shaped model sharded over both GPUs (--device-map auto, no cap),
#      dense ARC-Challenge analysis + 4 Iterative Pruning steps  -> OUT/gpu_shard70b.json
#   2. multi_gpu.py single / ddp (torchrun, 2 ranks) / compare: the 2-GPU data-parallel numbers of
#      BENCHMARKS.md section 5, re-measured                      -> OUT/mg/{single,ddp,compare}.{json,npz}
# One log, OUT/gpu_x2.log (7 files in all: the device tool brings back at most 8).
# Part 2 runs even if part 1 fails. Extra arguments go to both scripts, e.g. the CPU smoke test:
#   bash benchmarks/gpu_x2.sh /tmp/x2 --tiny --limit 32
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_x2.sh OUT [extra args for both scripts, e.g. --tiny --limit 32]}
shift
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
mkdir -p "$out/mg"
log="$out/gpu_x2.log"
t0=$(date +%s)
stamp() { echo "== $1: $(( $(date +%s) - t0 )) s since start ($(date -u +%FT%TZ))" | tee -a "$log"; }
stamp "start"
python3 benchmarks/gpu_shard70b.py --tokenizer .carry/smollm2-tokenizer --out "$out" "$@" 2>&1 | tee -a "$log"
stamp "gpu_shard70b exit $?"
python3 benchmarks/multi_gpu.py single --tokenizer .carry/smollm2-tokenizer --out "$out/mg" "$@" 2>&1 | tee -a "$log"
stamp "multi_gpu single exit $?"
python3 -m torch.distributed.run --nproc-per-node 2 benchmarks/multi_gpu.py ddp --tokenizer .carry/smollm2-tokenizer \
    --out "$out/mg" "$@" 2>&1 | tee -a "$log"
stamp "multi_gpu ddp exit $?"
python3 benchmarks/multi_gpu.py compare --out "$out/mg" 2>&1 | tee -a "$log"
stamp "done"
