"""ViT-B/32 (benchmarks/models.py) quantized two ways, eval, beside each other: `effops.quantize` (exact 8-bit
activations) against torch's dynamic int8 (`torch.ao.quantization.quantize_dynamic`, FBGEMM, 7-bit
activations), and the fp32 original; the cosine similarity of each quantized model's logits to fp32's.

    python -m benchmarks.vit_int8_vs_fbgemm [--batches 1,8] [--rounds 5]

Wall clock at torch's thread count, interleaved rounds, medians (benchmarks/common.py). Both transforms
leave the attention's out_proj in fp32 (nn.MultiheadAttention reads its weight directly).
"""
import argparse
import copy
import warnings

import torch

import effops
from benchmarks import models
from benchmarks.common import compare


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = models.MODELS["vit_b_32"]().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices; quantize's report of skipped layers
        ours = effops.quantize(copy.deepcopy(base))
        fbgemm = torch.ao.quantization.quantize_dynamic(copy.deepcopy(base), {torch.nn.Linear}, dtype=torch.qint8)
    for batch in (int(b) for b in args.batches.split(",")):
        x = models.example_input("vit_b_32", batch)
        with torch.no_grad():
            ref = base(x)
            for name, model in (("effops", ours), ("fbgemm", fbgemm)):
                cos = torch.nn.functional.cosine_similarity(model(x).flatten(), ref.flatten(), dim=0).item()
                print("batch %d: %s logits' cosine similarity to fp32 %.5f" % (batch, name, cos))
            impls = {"fbgemm int8": lambda: fbgemm(x), "effops int8": lambda: ours(x), "eager fp32": lambda: base(x)}
            compare("model vit_b_32", "eval b%d" % batch, impls, "fbgemm int8", rounds=args.rounds, min_time=0.5)


if __name__ == "__main__":
    main()
