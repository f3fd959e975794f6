"""Do two run folders of the same command hold the same numbers? (e.g. one made by an older declens)

Both folders are read through ``declens.load_result`` (an older schema is converted to the current one), so
renamed keys compare as the same quantity; then every number of the result, its per-layer scores included,
is compared. Provenance (versions, timings) and the recorded configuration (which gains fields over
versions) are not compared, nor is the ``work`` block of a prune result (timings, execution counters).

    python benchmarks/same_numbers.py runs/before/letter runs/after/letter

Prints one line per differing quantity (its path, how many values differ, the largest absolute difference)
and ends with ``identical`` or ``DIFFERENT``; the exit status is 0 only when every number is identical.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import numpy as np

import declens
from declens.results import to_jsonable

SKIPPED = ("provenance", "config", "work")


def _leaves(x: Any, path: str, out: dict[str, Any]) -> None:
    """Flatten nested dicts/lists into ``path -> value``."""
    if isinstance(x, dict):
        for k, v in x.items():
            _leaves(v, f"{path}.{k}" if path else str(k), out)
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            _leaves(v, f"{path}[{i}]", out)
    else:
        out[path] = x


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float)) and a == b)


def compare(a_dir: str, b_dir: str) -> list[str]:
    """Lines naming every quantity that differs between the two folders' results (empty: identical)."""
    a, b = declens.load_result(a_dir), declens.load_result(b_dir)
    if type(a) is not type(b):
        return [f"different kinds of result: {type(a).__name__} and {type(b).__name__}"]
    da = {k: v for k, v in to_jsonable(a.to_dict()).items() if k not in SKIPPED}  # arrays as lists
    db = {k: v for k, v in to_jsonable(b.to_dict()).items() if k not in SKIPPED}
    la, lb = {}, {}
    _leaves(da, "", la)
    _leaves(db, "", lb)
    lines = [f"only in {a_dir}: {k}" for k in sorted(la.keys() - lb.keys())]
    lines += [f"only in {b_dir}: {k}" for k in sorted(lb.keys() - la.keys())]
    groups: dict[str, list[tuple[Any, Any]]] = {}
    for k in sorted(la.keys() & lb.keys()):
        if not _same(la[k], lb[k]):
            groups.setdefault(k.split("[")[0], []).append((la[k], lb[k]))
    for name, pairs in groups.items():
        nums = [abs(x - y) for x, y in pairs if isinstance(x, (int, float)) and isinstance(y, (int, float))]
        lines.append(f"{name}: {len(pairs)} value(s) differ" + (f", max |diff| {max(nums):.3g}" if nums else ""))
    sa, sb = getattr(a, "scores", None), getattr(b, "scores", None)
    if hasattr(sa, "scores") and hasattr(sb, "scores"):  # the per-layer option scores [L, N, K] of an analysis
        for field in ("layer_ids", "scores", "norm_scores", "gold", "n_options", "embedding"):
            x, y = getattr(sa, field, None), getattr(sb, field, None)
            if x is None and y is None:
                continue
            if x is None or y is None or np.shape(x) != np.shape(y):
                lines.append(f"scores.{field}: present or shaped differently")
            elif not np.array_equal(np.asarray(x), np.asarray(y), equal_nan=np.asarray(x).dtype.kind == "f"):
                d = np.nanmax(np.abs(np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)))
                lines.append(f"scores.{field}: {int(np.sum(np.asarray(x) != np.asarray(y)))} value(s) differ, max |diff| {d:.3g}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="a run folder (e.g. made by the older version)")
    ap.add_argument("b", help="a run folder of the same command (e.g. made by this version)")
    args = ap.parse_args(argv)
    lines = compare(args.a, args.b)
    for line in lines:
        print(line)
    print("DIFFERENT" if lines else "identical")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
