"""Crossover check for the dwpw_conv2d cpu decline rule (effops/ops/dwpw_conv2d.py:_cpu_faster).

Forces the cpu kernel and, interleaved with it, times torch's two-conv block in both layouts; prints
(same-layout torch time / fused time) and (faster torch layout / fused time), min of 9 single calls,
for the benchmark's quick shapes at 1 and 2 threads, forward and a training step.
Run: PYTHONPATH=. python benchmarks/dwpw_crossover.py
"""
import sys, time, torch, effops, torch.nn.functional as F
from effops import _backends
from effops.ops import dwpw_conv2d
torch.manual_seed(0)
def ref(x,dw,pw): return F.conv2d(F.relu6(F.conv2d(x,dw,None,1,1,1,x.shape[1])),pw)
def eff(x,dw,pw): return dwpw_conv2d(x,dw,pw,stride=1,padding=1,activation="relu6")
def t(fn, reps):
    ts=[]
    for _ in range(reps):
        s=time.perf_counter(); fn(); ts.append(time.perf_counter()-s)
    return min(ts)
for th in (1,2):
    torch.set_num_threads(th)
    for (N,C,O,H) in [(4,32,64,112),(4,64,128,56),(4,256,256,14),(4,512,512,7)]:
        x0=torch.randn(N,C,H,H); dw=torch.randn(C,1,3,3)/3; pw=torch.randn(O,C,1,1)/C**.5
        xs={"nchw":x0,"cl":x0.contiguous(memory_format=torch.channels_last)}
        tb={}
        for lay,x in xs.items():
            for mode in ("fwd","train"):
                xg=x.clone().requires_grad_(); dwg=dw.clone().requires_grad_(); pwg=pw.clone().requires_grad_()
                gy=None
                def run(f, b):
                    def g():
                        with _backends.use_backend(b):
                            if mode=="fwd":
                                with torch.no_grad(): f(x,dw,pw)
                            else:
                                y=f(xg,dwg,pwg); y.sum().backward()
                    return g
                fe=run(eff,"cpu")
                try: fe()
                except Exception as e: print(th,N,C,O,H,lay,mode,"declined"); continue
                # torch best of both layouts
                def torchbest():
                    best=[]
                    for lx in xs.values():
                        if mode=="fwd":
                            with torch.no_grad(): best.append(t(lambda: ref(lx,dw,pw),1))
                        else:
                            lg=lx.clone().requires_grad_(); best.append(t(lambda: ref(lg,dwg,pwg).sum().backward(),1))
                    return best
                rs=[];es=[]
                for r in range(9):
                    es.append(t(fe,1)); rs.append(torchbest())
                tn=min(r[0] for r in rs); tc=min(r[1] for r in rs); te=min(es)
                same = tn if lay=="nchw" else tc
                print(th, (N,C,O,H), lay, mode, "same-layout torch/effops %.2f  best-torch/effops %.2f"%(same/te, min(tn,tc)/te), flush=True)
