"""docs/reproduction/summary.json: per model/task, the dense analysis summary and curves and every critical ratio."""
import json, sys
from declens.analyses.study import load_study
out = {}
for folder in sys.argv[2:]:
    st = load_study(folder)
    for key, a in sorted(st.results.get("analysis", {}).items()):
        m = a.config.get("model", "")
        model = "smollm2-135m" if "smollm2" in m else m
        s = a.to_dict()["summary"]
        name = f"{model}:{key}"
        if name in out and out[name]["analysis"]["rows"] != len(a.item_ids):  # the same task on other rows
            name = f"{name}:{len(a.item_ids)}rows"
        ent = out.setdefault(name, {})
        ent["analysis"] = {"final_accuracy": s.get("final_accuracy"), "final_accuracy_norm": s.get("final_accuracy_norm"),
                           "final_dm": s.get("final_dm"), "chance": s.get("chance"), "transition_layer": s.get("transition_layer"),
                           "rows": len(a.item_ids), "dm": [round(float(x), 3) for x in a.metrics.dm], "accuracy": [round(float(x), 3) for x in a.metrics.acc]}
        for stage in ("prune", "baselines"):
            pr = st.results.get(stage, {}).get(key)
            if pr is not None:
                ent.setdefault("critical_ratio", {}).update({k: v for k, v in pr.critical.items()})
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(len(out), "entries")
