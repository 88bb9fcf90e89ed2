"""masked_linear in bf16 (or --dtype float32) against torch's own F.linear in that dtype on the dense
masked weight (torch's bf16 GEMM is native, oneDNN vdpbf16ps, on AVX512-BF16 CPUs), one thread,
CPU time of the thread (time.thread_time), interleaved medians (benchmarks.common.compare with
cpu_time_fn): the figures of docs/masked_linear.md's bf16 section.

Rows: block-32 (and any other pattern) at the given densities, 4096x4096 weight, M tokens:
  torch           F.linear(x, W * mask), the masked weight made outside the timing (the baseline)
  auto            masked_linear(x, w, mask): the automatic choice, the mask scanned per call
  cpu             the cpu backend forced (the sparse kernel even where auto declines)
  index           the cpu backend forced, given masked_linear_index(mask) (what SparseLinear holds)
  index+packed    the same with masked_linear_pack(w, index) (SparseLinear.pack_weights())
  module          SparseLinear.from_linear(nn.Linear without bias holding w, mask) with pack_weights(),
                  eval mode: the automatic choice with the index and packed weights the module holds

Run: PYTHONPATH=. python -m benchmarks.masked_bf16_rows [--patterns block32,unstructured]
     [--densities 0.1] [--shapes 4096x4096x256] [--rounds 7] [--dtype bfloat16|float32]
"""
import argparse

import torch
import torch.nn.functional as F

import effops
from benchmarks.bench_masked_linear import make_mask
from benchmarks.common import compare, cpu_time_fn
from effops.nn import SparseLinear
from effops.ops.masked_linear import masked_linear, masked_linear_index, masked_linear_pack


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--patterns", default="block32,unstructured")
    p.add_argument("--densities", default="0.1")
    p.add_argument("--shapes", default="4096x4096x256", help="NxKxM, comma separated")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--min-time", type=float, default=0.3)
    p.add_argument("--impls", default="auto,cpu,index,index+packed,module")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args()
    torch.set_num_threads(1)
    print("cpu level %s, torch capability %s, one thread, CPU time" % (effops.cpu_isa.current(),
                                                                         torch.backends.cpu.get_cpu_capability()))
    wanted = args.impls.split(",")
    dtype = getattr(torch, args.dtype)
    for shape in args.shapes.split(","):
        n, k, m = (int(v) for v in shape.split("x"))
        for pattern in args.patterns.split(","):
            for density in (float(d) for d in args.densities.split(",")):
                torch.manual_seed(0)
                x = torch.randn(m, k, dtype=dtype)
                w = torch.randn(n, k, dtype=dtype)
                mask = make_mask(pattern, n, k, 1 - density)
                wm = w * mask
                index = masked_linear_index(mask)
                packed = masked_linear_pack(w, index)

                def forced(**kw):
                    def call():
                        with effops.use_backend("cpu"):
                            return masked_linear(x, w, mask, **kw)
                    return call

                linear = torch.nn.Linear(k, n, bias=False, dtype=dtype)
                with torch.no_grad():
                    linear.weight.copy_(w)
                module = SparseLinear.from_linear(linear, mask).eval()
                module.pack_weights()
                impls = {"torch": lambda: F.linear(x, wm)}
                all_impls = {"auto": lambda: masked_linear(x, w, mask), "cpu": forced(),
                             "index": forced(index=index), "index+packed": forced(index=index, packed=packed),
                             "module": lambda: module(x)}
                impls.update({name: all_impls[name] for name in wanted})
                case = "%dx%d M=%d %s %g%% dense %s" % (n, k, m, pattern, 100 * density, args.dtype)
                with torch.no_grad():
                    rows = compare("fwd", case, impls, "torch", rounds=args.rounds,
                                   min_time=args.min_time, timer=cpu_time_fn)
                print("%-50s %s" % (case, "  ".join("%s %.2fx (%.2f ms)" % (r["impl"], r["speedup"], r["time_ms"])
                                                     for r in rows)), flush=True)


if __name__ == "__main__":
    main()
