"""Re-measure the masked_linear full-sweep cases changed after the sweep in docs/perf/cpu-masked-full
(the CSR kernels' span layout: 2048 tokens on 4096x4096 and 11008 inputs at 256 tokens, 90-95%
unstructured and 2:4; the block kernel's 504-row chunks: block-32 90% at 2048 tokens) without the
whole 15-minute sweep: PYTHONPATH=. python benchmarks/masked_resweep.py"""
import json
import os

import torch

from benchmarks import bench_masked_linear as b, run as r

CASES = [("unstructured", 0.9), ("unstructured", 0.95), ("2:4", 0.9)]
b._cases = lambda quick: ([((4096, 4096, 2048), "block32", 0.9, torch.float32)]
                          + [(shape, p, s, torch.float32) for shape in ((4096, 4096, 2048), (4096, 11008, 256))
                             for p, s in CASES])
rows = b.run(False, "cpu")
out = "docs/perf/cpu-masked-resweep"
os.makedirs(out, exist_ok=True)
m = r.machine_info("cpu")
open(out + "/results.md", "w").write("Measured %s, commit %s, %d threads\n\n" % (m["date"], m["commit"], m["threads"]) + r.markdown(rows))
json.dump(dict(machine=m, rows=rows), open(out + "/results.json", "w"), indent=1)
