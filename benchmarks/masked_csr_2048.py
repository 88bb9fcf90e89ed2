"""Re-measure the masked_linear full-sweep cases the CSR span layout changed (2048 tokens, 90-95%)
without the whole 15-minute sweep: PYTHONPATH=. python benchmarks/masked_csr_2048.py"""
import json, torch
from benchmarks import bench_masked_linear as b, run as r
b._cases = lambda quick: [((4096, 4096, 2048), p, s) for p, s in (("unstructured", 0.9), ("unstructured", 0.95), ("2:4", 0.9))]
rows = b.run(False, "cpu")
out = "docs/perf/cpu-masked-2048-csr"
m = r.machine_info("cpu")
open(out + "/results.md", "w").write("Measured %s, commit %s, %d threads\n\n" % (m["date"], m["commit"], m["threads"]) + r.markdown(rows))
json.dump(dict(machine=m, rows=rows), open(out + "/results.json", "w"), indent=1)
