"""Quiet re-measure of inference samples/s: teacher vs its [0,2,4] and [0,3] layer subsets (same compute as the
trained students), interleaved, 3 repeats each, over the SST-2 validation set (batch 64, max_length 64)."""
import os, sys, time, json
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import torch
from common import sst2_setup
teacher = sys.argv[1]
mods = {}
for name, layers in {"teacher": None, "3-layer": [0, 2, 4], "2-layer": [0, 3]}.items():
    dm, module = sst2_setup(5e-5, [], None, backbone=teacher, **({"backbone_layers": layers} if layers else {}))
    dm.setup("validate"); module.build(dm.data_info); mods[name] = module.model.eval()
loader = list(dm.val_dataloader())
res = {k: [] for k in mods}
with torch.no_grad():
    for rep in range(4):
        for name, model in mods.items():
            t0 = time.perf_counter(); n = 0
            for b in loader:
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b.get("token_type_ids")); n += b["input_ids"].shape[0]
            if rep: res[name].append(n / (time.perf_counter() - t0))
best = {k: max(v) for k, v in res.items()}
print(json.dumps({k: [round(x, 1) for x in v] for k, v in res.items()}))
print({k: round(best[k] / best["teacher"], 3) for k in best})
