"""Interleaved timing of effops Int8Linear (dynamic) vs torch quantize_dynamic (FBGEMM) vs fp32 F.linear,
K = N = 4096, best of 3 rounds, all three in one process so the ratios share the machine state.
Usage: python -m benchmarks.int8_interleaved 16 256 2048"""
import sys, time, torch, torch.nn.functional as F, effops
torch.manual_seed(0)
K=N=4096
lin=torch.nn.Linear(K,N)
fb=torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin),{torch.nn.Linear},dtype=torch.qint8)
ours=effops.nn.Int8Linear.from_linear(lin, mode="dynamic")
for M in [int(m) for m in sys.argv[1:]]:
    x=torch.randn(M,K)
    fns={"ours":lambda: ours(x),"fbgemm":lambda: fb(x),"fp32":lambda: F.linear(x,lin.weight,lin.bias)}
    with torch.no_grad():
        for f in fns.values(): f()
        reps=20 if M<=16 else (3 if M<=256 else 1)
        best={k:1e9 for k in fns}
        for r in range(3):
            for k,f in fns.items():
                s=time.perf_counter()
                for _ in range(reps): f()
                best[k]=min(best[k],(time.perf_counter()-s)/reps)
    print(f"M={M} ours {best['ours']*1e3:.2f} ms  vs fbgemm {best['fbgemm']/best['ours']:.2f}x  vs fp32 {best['fp32']/best['ours']:.2f}x", flush=True)
