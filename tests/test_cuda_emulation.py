"""effops' CUDA kernels (csrc/cuda/*.cu) run on the CPU under a host emulation of the CUDA execution
model (tests/cuda_emulation, docs/cuda-emulation.md), compared with exact references.

The kernel source is compiled by g++ as written (launches rewritten into emulator calls; the int8
GEMM's mma.sync has a marked emulation hook), with AddressSanitizer and UBSan: an out-of-bounds or
misaligned access fails the run. What this checks: indexing, bounds, shared-memory staging, the mma
fragment layouts (the emulated mma follows the PTX ISA's layout, transcribed independently of the
kernel), the epilogue's arithmetic and the launch tables; barrier placement under two adversarial
thread schedules. What it does not: GPU speed, the GPU memory model (no race detector), real
tensor-core hardware. The last tests plant bugs in copies of the kernels to show the checks fail.
"""
import importlib.util
import math
import os
import subprocess
from fractions import Fraction

import numpy as np
import pytest
import torch

from conftest import device

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("cuda_emulation_build", os.path.join(HERE, "cuda_emulation", "build.py"))
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

pytestmark = [
    pytest.mark.skipif(build.missing_tools() is not None, reason=str(build.missing_tools())),
    # On a GPU (make gpu-check) the kernels themselves run in the other tests: no CPU emulation there.
    pytest.mark.skipif(device().type == "cuda", reason="tests on CUDA tensors run the real CUDA kernels"),
]

INT32, FLOAT, BF16, HALF = 0, 1, 2, 3  # Int8OutKind
F32, BF16_P, F16_P = 0, 1, 2  # AdamDtype
# adam_step's launch tables shrunk for the emulation build that exercises multi-launch packing.
SMALL_TABLES = dict(kMaxTensors=3, kMaxBlocks=5, kChunk=4096)


@pytest.fixture(scope="session")
def emu_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cuda_emulation"))


@pytest.fixture(scope="session")
def int8_exe():
    return build.build("int8_gemm", "int8_gemm_main.cpp", launches=1)


@pytest.fixture(scope="session")
def adam_exe():
    return build.build("adam_step", "adam_step_main.cpp", launches=2)


@pytest.fixture(scope="session")
def adam_small_exe():
    return build.build("adam_step", "adam_step_main.cpp", launches=2, constants=SMALL_TABLES)


# Thread schedules (cuda_host_shim.h, effops_emu::Schedule): round robin by default.
REVERSE, PRIORITY = ("--reverse",), ("--priority",)


def run(exe, dirs, schedule=()):
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    proc = subprocess.run([exe, *schedule, *dirs], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, "emulated kernel failed (rc %d):\n%s" % (proc.returncode, proc.stderr[-8000:])
    out = []
    for d in dirs:
        with open(os.path.join(d, "status.txt")) as f:
            lines = f.read().split("\n")
        err, n = map(int, lines[0].split())
        out.append((err, [tuple(map(int, line.split())) for line in lines[1:1 + n]]))
    return out


def write_params(d, values):
    with open(os.path.join(d, "params.txt"), "w") as f:
        f.write(" ".join(str(int(v)) for v in values) + "\n")


def strided_span(mat, ld, rng):
    """The bytes of `mat` (rows x cols) stored with row stride ld, junk in the padding, cut after the
    last element (the harness allocates exactly this span)."""
    rows, cols = mat.shape
    if rows == 0 or cols == 0:
        return np.zeros(0, mat.dtype)
    full = rng.integers(-128, 128, size=(rows, ld)).astype(mat.dtype)
    full[:, :cols] = mat
    return full.reshape(-1)[:(rows - 1) * ld + cols]


# ---------------------------------------------------------------------------------------------------
# int8 GEMM
# ---------------------------------------------------------------------------------------------------
def int8_case(d, a, b, b_is_kn, kind, lda=None, ldb=None, ldo=None, offsets=(0, 0, 0), row_scale=None,
              col_scale=None, bias=None, seed=0):
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(seed)
    M, K = a.shape
    N = b.shape[1] if b_is_kn else b.shape[0]
    lda, ldb, ldo = lda or K, ldb or (N if b_is_kn else K), ldo or N
    strided_span(a, lda, rng).tofile(os.path.join(d, "a.bin"))
    strided_span(b, ldb, rng).tofile(os.path.join(d, "b.bin"))
    if kind != INT32:
        row_scale.astype(np.float32).tofile(os.path.join(d, "row_scale.bin"))
        col_scale.astype(np.float32).tofile(os.path.join(d, "col_scale.bin"))
        if bias is not None:
            bias.astype(np.float32).tofile(os.path.join(d, "bias.bin"))
    write_params(d, [M, N, K, lda, ldb, ldo, b_is_kn, kind, bias is not None, *offsets])
    return dict(dir=d, M=M, N=N, ldo=ldo, kind=kind)


OUT_NP = {INT32: np.int32, FLOAT: np.uint32, BF16: np.uint16, HALF: np.uint16}


def int8_output(case):
    """The output rows (M x N, as raw bits for floats), after checking the padding kept its 0xCD fill."""
    M, N, ldo = case["M"], case["N"], case["ldo"]
    raw = np.fromfile(os.path.join(case["dir"], "out.bin"), dtype=OUT_NP[case["kind"]])
    if M == 0 or N == 0:
        return raw.reshape(M, N)
    full = np.concatenate([raw, np.zeros(ldo - N, raw.dtype)]).reshape(M, ldo)
    pad = full[:-1, N:].view(np.uint8)
    assert (pad == 0xCD).all(), "the kernel wrote into the row padding (columns >= N)"
    return full[:, :N]


def exact_mm(a, b_kn):
    return a.astype(np.int64) @ b_kn.astype(np.int64)


def linear_reference_bits(acc, row_scale, col_scale, bias, kind):
    """((acc * row_scale) * col_scale + bias) in fp32, rounded once per operation, then cast (RNE)."""
    v = acc.astype(np.float32) * row_scale.astype(np.float32)[:, None]  # |acc| < 2^31: int64->f32 single rounding
    v = v * col_scale.astype(np.float32)[None, :]
    if bias is not None:
        v = v + bias.astype(np.float32)[None, :]
    if kind == FLOAT:
        return v.view(np.uint32)
    t = torch.from_numpy(np.ascontiguousarray(v)).to(torch.bfloat16 if kind == BF16 else torch.float16)
    return t.view(torch.int16).numpy().view(np.uint16)


def rand_i8(rng, *shape):
    return rng.integers(-128, 128, size=shape).astype(np.int8)


MM_SHAPES = [(1, 1, 1), (1, 17, 33), (65, 70, 129), (130, 64, 200), (64, 64, 64), (3, 5, 4096), (2, 3, 0)]


def test_int8_mm_shapes(int8_exe, emu_dir):
    rng = np.random.default_rng(1)
    cases, refs = [], []
    for M, N, K in MM_SHAPES:
        a, b = rand_i8(rng, M, K), rand_i8(rng, K, N)
        cases.append(int8_case(os.path.join(emu_dir, "mm_%d_%d_%d" % (M, N, K)), a, b, True, INT32))
        refs.append(exact_mm(a, b))
    results = run(int8_exe, [c["dir"] for c in cases], PRIORITY)
    for (M, N, K), case, ref, (err, launches) in zip(MM_SHAPES, cases, refs, results):
        assert err == 0
        assert launches == [((M + 63) // 64, (N + 63) // 64, 1, 128, 1, 1)], (M, N, K)
        np.testing.assert_array_equal(int8_output(case), ref, err_msg=str((M, N, K)))


@pytest.mark.parametrize("fill", ["max", "min", "minmax", "alternating"])
def test_int8_mm_extremes(int8_exe, emu_dir, fill):
    # K = 4096: 64 k-steps of the tile loop, with sums near 2^26 in magnitude; a partial tile.
    M, N, K = 33, 9, 4096
    if fill == "max":
        a, b = np.full((M, K), 127, np.int8), np.full((K, N), 127, np.int8)
    elif fill == "min":
        a, b = np.full((M, K), -128, np.int8), np.full((K, N), -128, np.int8)
    elif fill == "minmax":
        a, b = np.full((M, K), -128, np.int8), np.full((K, N), 127, np.int8)
    else:
        a = np.where(np.arange(M * K).reshape(M, K) % 3 == 0, -128, 127).astype(np.int8)
        b = np.where(np.arange(K * N).reshape(K, N) % 5 == 0, -127, -128).astype(np.int8)
    case = int8_case(os.path.join(emu_dir, "mm_ext_" + fill), a, b, True, INT32)
    (err, _), = run(int8_exe, [case["dir"]])
    assert err == 0
    np.testing.assert_array_equal(int8_output(case), exact_mm(a, b))


# (M, N, K, lda, ldb, ldo, (a, b, out) byte offsets): A's 16-byte vector path needs lda % 16 == 0 and
# a 16-byte aligned base; B (as (N, K)) the same with ldb. Both taken, neither, and one of the two.
STRIDES = [
    (65, 70, 128, 128, 128, 70, (0, 0, 0)),     # vector loads for A and B, full segments only
    (65, 70, 200, 208, 224, 75, (0, 0, 0)),     # vector loads with a byte-wise tail segment, padded ldo
    (65, 70, 128, 128, 128, 70, (1, 3, 0)),     # misaligned bases: byte path everywhere
    (33, 20, 96, 100, 96, 20, (0, 0, 4)),       # lda % 16 != 0: bytes for A, vectors for B
    (17, 130, 129, 129, 129, 131, (0, 8, 0)),   # K % 16 != 0
]


@pytest.mark.parametrize("kind", [FLOAT, BF16, HALF])
def test_int8_linear_strides_and_epilogue(int8_exe, emu_dir, kind):
    rng = np.random.default_rng(10 + kind)
    cases, refs = [], []
    for j, (M, N, K, lda, ldb, ldo, offs) in enumerate(STRIDES):
        a, w = rand_i8(rng, M, K), rand_i8(rng, N, K)
        # Scales across many binades (bf16/fp16 rounding of every kind, fp16 overflow to inf and
        # subnormals); bias on every other case.
        row_scale = (rng.uniform(0.5, 1.0, M) * 2.0 ** rng.integers(-20, 4, M)).astype(np.float32)
        col_scale = (rng.uniform(0.5, 1.0, N) * 2.0 ** rng.integers(-12, 4, N)).astype(np.float32)
        bias = rng.standard_normal(N).astype(np.float32) * 100 if j % 2 == 0 else None
        cases.append(int8_case(os.path.join(emu_dir, "lin_%d_%d" % (kind, j)), a, w, False, kind, lda, ldb, ldo,
                               offs, row_scale, col_scale, bias, seed=j))
        refs.append(linear_reference_bits(exact_mm(a, w.T), row_scale, col_scale, bias, kind))
    # A different thread schedule per kind: the staging must not depend on which thread runs first.
    results = run(int8_exe, [c["dir"] for c in cases], {FLOAT: (), BF16: REVERSE, HALF: PRIORITY + REVERSE}[kind])
    for shape, case, ref, (err, _) in zip(STRIDES, cases, refs, results):
        assert err == 0
        np.testing.assert_array_equal(int8_output(case), ref, err_msg=str(shape))


def test_int8_mm_strided_and_misaligned(int8_exe, emu_dir):
    # int8_mm's B is (K, N): staged transposed, element by element (no vector path); A may vectorize.
    rng = np.random.default_rng(3)
    specs = [(65, 70, 128, 128, 80, 70, (0, 0, 0)), (65, 70, 128, 144, 70, 71, (5, 1, 4)),
             (130, 3, 77, 80, 3, 3, (0, 0, 0))]
    cases, refs = [], []
    for j, (M, N, K, lda, ldb, ldo, offs) in enumerate(specs):
        a, b = rand_i8(rng, M, K), rand_i8(rng, K, N)
        cases.append(int8_case(os.path.join(emu_dir, "mm_str_%d" % j), a, b, True, INT32, lda, ldb, ldo, offs, seed=j))
        refs.append(exact_mm(a, b))
    for case, ref, (err, _) in zip(cases, refs, run(int8_exe, [c["dir"] for c in cases], REVERSE)):
        assert err == 0
        np.testing.assert_array_equal(int8_output(case), ref)


def test_int8_linear_k4096_and_k0(int8_exe, emu_dir):
    rng = np.random.default_rng(4)
    cases, refs = [], []
    for j, (M, N, K) in enumerate([(3, 70, 4096), (5, 6, 0)]):
        a, w = rand_i8(rng, M, K), rand_i8(rng, N, K)
        rs, cs = rng.uniform(1e-4, 1e-2, M).astype(np.float32), rng.uniform(1e-3, 1e-1, N).astype(np.float32)
        bias = rng.standard_normal(N).astype(np.float32)
        cases.append(int8_case(os.path.join(emu_dir, "lin_k_%d" % j), a, w, False, FLOAT, row_scale=rs, col_scale=cs,
                               bias=bias))
        refs.append(linear_reference_bits(exact_mm(a, w.T), rs, cs, bias, FLOAT))
    for case, ref, (err, _) in zip(cases, refs, run(int8_exe, [c["dir"] for c in cases])):
        assert err == 0
        np.testing.assert_array_equal(int8_output(case), ref)


def test_int8_random_shapes(int8_exe, emu_dir):
    # Random shapes, strides, base offsets and epilogues, in one run.
    rng = np.random.default_rng(11)
    cases, refs = [], []
    for j in range(12):
        M, N, K = (int(x) for x in rng.integers(1, 150, 3))
        kind = int(rng.integers(0, 4))
        lda = K + int(rng.choice([0, 16 - K % 16 if K % 16 else 0, 3]))
        ldb_extra, ldo = int(rng.choice([0, 16, 5])), N + int(rng.integers(0, 4))
        # int8 inputs may start at any byte; the output at any multiple of its element size.
        offs = (int(rng.choice([0, 16, 1, 7])), int(rng.choice([0, 16, 1, 7])), int(rng.choice([0, 4, 8])))
        a = rand_i8(rng, M, K)
        d = os.path.join(emu_dir, "rand_%d" % j)
        if kind == INT32:
            b = rand_i8(rng, K, N)
            cases.append(int8_case(d, a, b, True, INT32, lda, N + ldb_extra, ldo, offs, seed=j))
            refs.append(exact_mm(a, b))
        else:
            w = rand_i8(rng, N, K)
            rs = (rng.uniform(0.5, 1, M) * 2.0 ** rng.integers(-16, 2, M)).astype(np.float32)
            cs = (rng.uniform(0.5, 1, N) * 2.0 ** rng.integers(-16, 2, N)).astype(np.float32)
            bias = rng.standard_normal(N).astype(np.float32) if j % 3 else None
            cases.append(int8_case(d, a, w, False, kind, lda, K + ldb_extra, ldo, offs, rs, cs, bias, seed=j))
            refs.append(linear_reference_bits(exact_mm(a, w.T), rs, cs, bias, kind))
    for case, ref, (err, _) in zip(cases, refs, run(int8_exe, [c["dir"] for c in cases], PRIORITY)):
        assert err == 0
        np.testing.assert_array_equal(int8_output(case), ref, err_msg=case["dir"])


def test_int8_gemm_host_checks(int8_exe, emu_dir):
    rng = np.random.default_rng(5)
    a, b = rand_i8(rng, 4, 8), rand_i8(rng, 8, 6)
    one = np.ones(6, np.float32)
    bad_pair = int8_case(os.path.join(emu_dir, "bad_pair"), a, b, True, FLOAT, row_scale=np.ones(4, np.float32),
                         col_scale=one)
    empty = int8_case(os.path.join(emu_dir, "empty"), rand_i8(rng, 0, 8), b, True, INT32)
    (err1, l1), (err2, l2) = run(int8_exe, [bad_pair["dir"], empty["dir"]])
    assert (err1, l1) == (1, [])  # cudaErrorInvalidValue, nothing launched
    assert (err2, l2) == (0, [])


# ---------------------------------------------------------------------------------------------------
# Adam
# ---------------------------------------------------------------------------------------------------
def f32(x):
    return np.asarray(x, dtype=np.float32)


def fma32(a, b, c):
    """fp32 fused multiply-add, correctly rounded: a*b is exact in fp64; the fp64 sum's own rounding
    error is recovered (TwoSum) to break the one case where rounding twice differs, a sum rounded to
    fp64 exactly onto an fp32 rounding midpoint."""
    a, b, c = (np.asarray(x, np.float32).astype(np.float64) for x in (a, b, c))
    p = a * b
    s = p + c
    bb = s - p
    e = (p - (s - bb)) + (c - bb)
    r = s.astype(np.float32)
    r64 = r.astype(np.float64)
    other = np.where(s > r64, np.nextafter(r, np.float32(np.inf)), np.nextafter(r, np.float32(-np.inf)))
    o64 = other.astype(np.float64)
    tie = (s != r64) & (s == (r64 + o64) / 2) & (e != 0)
    toward_other = np.sign(e) == np.sign(o64 - s)
    return np.where(tie & toward_other, other, r).astype(np.float32)


def test_fma32_reference_is_exact():
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(3000) * 2.0 ** rng.integers(-30, 30, 3000)).astype(np.float32)
    b = (rng.standard_normal(3000) * 2.0 ** rng.integers(-30, 30, 3000)).astype(np.float32)
    c = (rng.standard_normal(3000) * 2.0 ** rng.integers(-60, 60, 3000)).astype(np.float32)
    # A double-rounding trap: a*b + c = 1 + 3*2^-24 - 2^-70 rounds in fp64 onto the midpoint between
    # 1 + 2^-23 and 1 + 2^-22; the correct fp32 result is the lower one.
    a = np.append(a, np.float32(1 + 2.0 ** -23))
    b = np.append(b, np.float32(2.0 ** -24 * (1 - 2.0 ** -23)))
    c = np.append(c, np.float32(1 + 2.0 ** -23))
    got = fma32(a, b, c)
    for x, y, z, g in zip(a, b, c, got):
        exact = Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))
        lo = np.float32(float(exact))  # candidates around the exact value, then pick the nearest (ties even)
        cands = {lo, np.nextafter(lo, np.float32(np.inf)), np.nextafter(lo, np.float32(-np.inf))}
        best = min(cands, key=lambda q: (abs(Fraction(float(q)) - exact), int(np.float32(q).view(np.uint32)) & 1))
        assert np.float32(g).view(np.uint32) == np.float32(best).view(np.uint32), (x, y, z)
    assert got[-1] == np.float32(1 + 2.0 ** -23)


DT = {F32: (np.uint32, torch.float32), BF16_P: (np.uint16, torch.bfloat16), F16_P: (np.uint16, torch.float16)}


def to_f32(bits, dtype):
    if dtype == F32:
        return bits.view(np.float32).copy()
    return torch.from_numpy(bits.view(np.int16).copy()).view(DT[dtype][1]).float().numpy()


def from_f32(x, dtype):
    """fp32 -> storage bits with round-to-nearest-even (torch's conversion)."""
    if dtype == F32:
        return f32(x).view(np.uint32)
    return torch.from_numpy(f32(x).copy()).to(DT[dtype][1]).view(torch.int16).numpy().view(np.uint16)


def adam_reference(t, h, dtype, master):
    """The arithmetic of adam_step.cu's kernel, one fp32 rounding per operation, on storage bits."""
    s_dtype = F32 if master else dtype
    g = to_f32(t["grad"], dtype)
    p = t["master"].view(np.float32).copy() if master else to_f32(t["param"], dtype)
    m, v = to_f32(t["exp_avg"], s_dtype), to_f32(t["exp_avg_sq"], s_dtype)
    out = {}
    if h["unscale"]:
        g = f32(g / h["grad_scale"])
        out["grad"] = from_f32(g, dtype)
    if h["maximize"]:
        g = -g
    if h["has_weight_decay"]:
        if h["decoupled"]:
            p = f32(p * h["decay_factor"])
        else:
            g = fma32(p, h["weight_decay"], g)
    diff = f32(g - m)
    lw = h["lerp_weight"]
    mk = fma32(lw, diff, m) if lw < 0.5 else fma32(f32(lw - np.float32(1)), diff, g)
    vk = fma32(f32(h["one_minus_beta2"] * g), g, f32(v * h["beta2"]))
    vhat = vk
    if h["amsgrad"]:
        vhat = np.fmax(to_f32(t["max_exp_avg_sq"], s_dtype), vk)
        out["max_exp_avg_sq"] = from_f32(vhat, s_dtype)
    denom = f32(f32(np.sqrt(vhat) / t["bc2"]) + h["eps"])
    p = f32(p + f32(f32(t["neg_step"] * mk) / denom))
    out["exp_avg"], out["exp_avg_sq"] = from_f32(mk, s_dtype), from_f32(vk, s_dtype)
    if master:
        out["master"] = p.view(np.uint32)
    out["param"] = from_f32(p, dtype)
    return out


def hyper(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
          decoupled=False, grad_scale=None):
    """AdamHyperArgs as csrc/bindings/cuda/adam_step.cpp computes them (in double, then rounded)."""
    return dict(lerp_weight=np.float32(1.0 - beta1), beta2=np.float32(beta2), one_minus_beta2=np.float32(1.0 - beta2),
                eps=np.float32(eps), weight_decay=np.float32(weight_decay),
                decay_factor=np.float32(1.0 - lr * weight_decay),
                grad_scale=np.float32(grad_scale if grad_scale is not None else 1.0), amsgrad=amsgrad,
                maximize=maximize, decoupled=decoupled, has_weight_decay=weight_decay != 0.0,
                unscale=grad_scale is not None, lr=lr, beta1=beta1, beta2_double=beta2)


def f32_bits(x):
    return int(np.float32(x).view(np.uint32))


def make_tensors(rng, sizes, dtype, master, amsgrad, h, step=7):
    p_np = DT[dtype][0]
    s_dtype = F32 if master else dtype
    ts = []
    for n in sizes:
        w = rng.standard_normal(n).astype(np.float32)
        t = dict(n=n)
        t["param"] = from_f32(w, dtype)
        g_scale = h["grad_scale"] if h["unscale"] else 1  # scaled gradients when the step unscales them
        t["grad"] = from_f32(rng.standard_normal(n).astype(np.float32) * g_scale, dtype)
        t["exp_avg"] = from_f32(rng.standard_normal(n).astype(np.float32) * 0.1, s_dtype)
        t["exp_avg_sq"] = from_f32(rng.uniform(0, 0.01, n).astype(np.float32), s_dtype)
        if amsgrad:
            t["max_exp_avg_sq"] = from_f32(rng.uniform(0, 0.012, n).astype(np.float32), s_dtype)
        if master:  # a master copy close to, not equal to, the low-precision param
            t["master"] = (w + rng.standard_normal(n).astype(np.float32) * 1e-3).astype(np.float32).view(np.uint32)
        step_k = step + len(ts)  # per-tensor steps, as the glue allows
        t["neg_step"] = np.float32(-(h["lr"] / (1 - h["beta1"] ** step_k)))
        t["bc2"] = np.float32(math.sqrt(1 - h["beta2_double"] ** step_k))
        assert t["param"].dtype == p_np
        ts.append(t)
    return ts


ADAM_FIELDS = ["param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master"]


def adam_case(d, ts, h, dtype, master):
    os.makedirs(d, exist_ok=True)
    vals = [dtype, master, h["amsgrad"], h["maximize"], h["decoupled"], h["has_weight_decay"], h["unscale"]]
    vals += [f32_bits(h[k]) for k in ["lerp_weight", "beta2", "one_minus_beta2", "eps", "weight_decay",
                                        "decay_factor", "grad_scale"]]
    vals.append(len(ts))
    for i, t in enumerate(ts):
        vals += [t["n"], f32_bits(t["neg_step"]), f32_bits(t["bc2"])]
        for k in ADAM_FIELDS:
            if k in t:
                t[k].tofile(os.path.join(d, "t%d_%s.bin" % (i, k)))
    write_params(d, vals)


def check_adam(d, ts, h, dtype, master):
    for i, t in enumerate(ts):
        ref = adam_reference(t, h, dtype, master)
        for k in ADAM_FIELDS:
            if k not in t:
                continue
            got = np.fromfile(os.path.join(d, "t%d_%s.out" % (i, k)), dtype=t[k].dtype)
            want = ref.get(k, t[k])  # fields the step does not write must come back unchanged
            bad = np.flatnonzero(got != want)
            assert bad.size == 0, "tensor %d (numel %d) %s: %d elements differ, first at %d: got %r want %r" % (
                i, t["n"], k, bad.size, bad[0], got[bad[0]], want[bad[0]])


# Odd sizes, one spanning two 65536-element chunks, 35 tensors (> kMaxTensors = 32: two launches).
REAL_SIZES = [1, 7, 513, 2049, 65536 + 2051, 4097, 0, 333] + [5 + 37 * i for i in range(27)]

ADAM_CONFIGS = [
    dict(),
    dict(amsgrad=True, weight_decay=0.01, decoupled=True),
    dict(maximize=True, weight_decay=0.05, grad_scale=3.0),
    dict(beta1=0.3, amsgrad=True, weight_decay=0.02, grad_scale=1024.0, lr=0.01),  # lerp_weight >= 0.5 branch
]


@pytest.mark.parametrize("dtype,master", [(F32, False), (BF16_P, False), (BF16_P, True), (F16_P, False),
                                          (F16_P, True)], ids=["fp32", "bf16", "bf16-master", "fp16", "fp16-master"])
def test_adam_step_matches_reference(adam_exe, emu_dir, dtype, master):
    rng = np.random.default_rng(100 + 2 * dtype + master)
    cases = []
    for j, cfg in enumerate(ADAM_CONFIGS):
        h = hyper(**cfg)
        ts = make_tensors(rng, REAL_SIZES, dtype, master, h["amsgrad"], h)
        d = os.path.join(emu_dir, "adam_%d_%d_%d" % (dtype, master, j))
        adam_case(d, ts, h, dtype, master)
        cases.append((d, ts, h))
    results = run(adam_exe, [c[0] for c in cases], {BF16_P: REVERSE, F16_P: PRIORITY}.get(dtype, ()))
    for (d, ts, h), (err, launches) in zip(cases, results):
        assert err == 0
        # 33 blocks for the first 32 non-empty tensors (one spans two chunks), then the last 2.
        assert launches == [(33, 1, 1, 512, 1, 1), (2, 1, 1, 512, 1, 1)]
        check_adam(d, ts, h, dtype, master)


def expected_launches(sizes, max_tensors, max_blocks, chunk):
    """Greedy packing of (tensor, chunk) blocks into launch tables of at most max_tensors tensors and
    max_blocks blocks: an independent statement of what launch_all must produce."""
    launches, blocks, tensors = [], 0, set()
    for i, n in enumerate(sizes):
        for _ in range((n + chunk - 1) // chunk):
            if blocks == max_blocks or (i not in tensors and len(tensors) == max_tensors):
                launches.append(blocks)
                blocks, tensors = 0, set()
            blocks += 1
            tensors.add(i)
    if blocks:
        launches.append(blocks)
    return launches


# With 3 tensors, 5 blocks and 4096-element chunks per launch table: a tensor spanning several tables,
# tables closed by the tensor count and by the block count, both at once, and empty tensors between.
SMALL_SIZES = [
    [5000, 1, 4096, 12289, 3, 0, 8193, 20481, 7, 4095],
    [4096 * 5, 4096 * 5 + 1, 1, 1, 1, 1, 4096 * 3, 2, 4096 * 2],
    [1] * 10,
]


@pytest.mark.parametrize("sizes", SMALL_SIZES, ids=["mixed", "boundaries", "many-small"])
def test_adam_step_multi_launch_packing(adam_small_exe, emu_dir, sizes):
    rng = np.random.default_rng(sum(sizes))
    cases = []
    for dtype, master, cfg in [(F32, False, dict(amsgrad=True, weight_decay=0.01)),
                               (BF16_P, True, dict(weight_decay=0.01, decoupled=True, grad_scale=2.0))]:
        h = hyper(**cfg)
        ts = make_tensors(rng, sizes, dtype, master, h["amsgrad"], h)
        d = os.path.join(emu_dir, "adam_small_%d_%d" % (len(cases), sum(sizes)))
        adam_case(d, ts, h, dtype, master)
        cases.append((d, ts, h, dtype, master))
    want = expected_launches(sizes, SMALL_TABLES["kMaxTensors"], SMALL_TABLES["kMaxBlocks"], SMALL_TABLES["kChunk"])
    assert len(want) > 1
    for (d, ts, h, dtype, master), (err, launches) in zip(cases, run(adam_small_exe, [c[0] for c in cases])):
        assert err == 0
        assert [l[0] for l in launches] == want
        check_adam(d, ts, h, dtype, master)


# ---------------------------------------------------------------------------------------------------
# The emulation catches planted bugs (so the passes above mean something)
# ---------------------------------------------------------------------------------------------------
STAGE_SYNC = "    else load_rows(Bs, p.b, p.ldb, n0, p.N, k0, p.K, b_vec);\n    __syncthreads();\n"
LAST_MMA = "        for (int ni = 0; ni < 4; ++ni) mma_s8(acc[mi][ni], af[mi], bf[ni]);\n    }\n"
MUTANTS = {  # name: ((old, new), thread schedule that exposes it)
    # No barrier between staging a tile and reading fragments from it.
    "missing_stage_barrier": ((STAGE_SYNC, STAGE_SYNC.replace("    __syncthreads();\n", "")), ()),
    # No barrier before the next k-step overwrites the tile: seen when one warp runs ahead.
    "missing_trailing_barrier": ((LAST_MMA + "    __syncthreads();\n", LAST_MMA), PRIORITY),
    # A fragment registers swapped (row g+8 <-> column block +16): the emulated mma must notice, since
    # it follows the PTX ISA's layout and not the kernel's loads.
    "swapped_a_fragments": (("        af[mi][1] = *reinterpret_cast<const uint32_t*>(r + 8 * kLds);\n"
                             "        af[mi][2] = *reinterpret_cast<const uint32_t*>(r + 16);\n",
                             "        af[mi][1] = *reinterpret_cast<const uint32_t*>(r + 16);\n"
                             "        af[mi][2] = *reinterpret_cast<const uint32_t*>(r + 8 * kLds);\n"), ()),
    # The K tail of a tile not zero-filled: it keeps the previous k-step's (stale) bytes.
    "missing_zero_fill": (("? src[gr * ld + gk + j] : int8_t(0);", "? src[gr * ld + gk + j] : d[j];"), ()),
}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_emulation_catches_wrong_int8_kernel(emu_dir, mutant):
    mutation, schedule = MUTANTS[mutant]
    exe = build.build("int8_gemm", "int8_gemm_main.cpp", launches=1, mutations=[mutation], sanitize=False)
    rng = np.random.default_rng(7)
    a, w = rand_i8(rng, 65, 200), rand_i8(rng, 70, 200)
    rs, cs = np.ones(65, np.float32), np.ones(70, np.float32)
    case = int8_case(os.path.join(emu_dir, "mutant_" + mutant), a, w, False, FLOAT, row_scale=rs, col_scale=cs)
    (err, _), = run(exe, [case["dir"]], schedule)
    assert err == 0
    ref = linear_reference_bits(exact_mm(a, w.T), rs, cs, None, FLOAT)
    assert (int8_output(case) != ref).any(), "the planted bug went unnoticed"


def test_vector_staging_path_taken_and_not(emu_dir):
    # With the 16-byte staging loads planted to store zeros, the aligned cases of STRIDES go wrong and
    # the misaligned one stays exact: the tests above run each path they claim to.
    vec = "*reinterpret_cast<uint4*>(d) = *reinterpret_cast<const uint4*>(src + gr * ld + gk);"
    exe = build.build("int8_gemm", "int8_gemm_main.cpp", launches=1, sanitize=False,
                      mutations=[(vec, "*reinterpret_cast<uint4*>(d) = uint4{0, 0, 0, 0};")])
    rng = np.random.default_rng(13)
    cases, refs = [], []
    for j in (0, 2, 3):  # A and B vectorized; neither (misaligned bases); B only (lda % 16 != 0)
        M, N, K, lda, ldb, ldo, offs = STRIDES[j]
        a, w = rand_i8(rng, M, K), rand_i8(rng, N, K)
        rs, cs = np.ones(M, np.float32), np.ones(N, np.float32)
        cases.append(int8_case(os.path.join(emu_dir, "vecpath_%d" % j), a, w, False, FLOAT, lda, ldb, ldo, offs, rs,
                               cs))
        refs.append(linear_reference_bits(exact_mm(a, w.T), rs, cs, None, FLOAT))
    assert [err for err, _ in run(exe, [c["dir"] for c in cases])] == [0, 0, 0]
    assert [bool((int8_output(c) == r).all()) for c, r in zip(cases, refs)] == [False, True, False]


def test_emulation_reports_divergent_barrier(emu_dir):
    # A warp that returns early leaves the other three at __syncthreads forever.
    decl = "  int acc[2][4][4] = {};\n"
    exe = build.build("int8_gemm", "int8_gemm_main.cpp", launches=1, sanitize=False,
                      mutations=[(decl, decl + "  if (threadIdx.x >= 96) return;\n")])
    rng = np.random.default_rng(12)
    case = int8_case(os.path.join(emu_dir, "mutant_divergent"), rand_i8(rng, 5, 70), rand_i8(rng, 70, 6), True, INT32)
    with pytest.raises(AssertionError, match="deadlock in block .*: 96 threads wait at __syncthreads, 0 at a warp "
                                             "barrier .mma., 32 exited"):
        run(exe, [case["dir"]])


def test_emulation_catches_out_of_bounds_read(emu_dir):
    # A 16-byte load allowed 8 bytes past K: AddressSanitizer stops the run at the last row.
    exe = build.build("int8_gemm", "int8_gemm_main.cpp", launches=1,
                      mutations=[("gk + 16 <= K)", "gk + 8 <= K)")])
    rng = np.random.default_rng(8)
    a, w = rand_i8(rng, 65, 200), rand_i8(rng, 70, 200)
    case = int8_case(os.path.join(emu_dir, "mutant_oob"), a, w, False, FLOAT, 208, 208, 70,
                     row_scale=np.ones(65, np.float32), col_scale=np.ones(70, np.float32))
    with pytest.raises(AssertionError, match="AddressSanitizer: heap-buffer-overflow"):
        run(exe, [case["dir"]])


def test_emulation_catches_wrong_launch_table(emu_dir):
    # A tensor continued into the next launch table without its slot-0 entry.
    exe = build.build("adam_step", "adam_step_main.cpp", launches=2, constants=SMALL_TABLES,
                      mutations=[("          table.tensors[0] = tensors[k];", "          ;")], sanitize=False)
    rng = np.random.default_rng(9)
    sizes = SMALL_SIZES[0]
    h = hyper(weight_decay=0.01)
    ts = make_tensors(rng, sizes, F32, False, False, h)
    d = os.path.join(emu_dir, "mutant_adam")
    adam_case(d, ts, h, F32, False)
    proc = subprocess.run([exe, d], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]  # it runs, stepping the wrong tensor's elements
    with pytest.raises(AssertionError, match="elements differ"):
        check_adam(d, ts, h, F32, False)


def test_emulation_catches_write_before_a_buffer(emu_dir):
    # Every store shifted one element down: the first lands 4 bytes before the output, inside the
    # guard of a buffer 4 bytes past an aligned address (too close for AddressSanitizer's 8-byte
    # granules to poison): the harness's guard check stops the run.
    exe = build.build("int8_gemm", "int8_gemm_main.cpp", launches=1, sanitize=False,
                      mutations=[("+ i * p.ldo + n;", "+ i * p.ldo + n - 1;")])
    rng = np.random.default_rng(10)
    a, w = rand_i8(rng, 5, 40), rand_i8(rng, 7, 40)
    case = int8_case(os.path.join(emu_dir, "mutant_prefix"), a, w, False, FLOAT, offsets=(0, 0, 4),
                     row_scale=np.ones(5, np.float32), col_scale=np.ones(7, np.float32))
    with pytest.raises(AssertionError, match="a write before the start of a buffer"):
        run(exe, [case["dir"]])


def test_int8_gemm_reports_grid_limit(int8_exe, emu_dir):
    # Column tiles go on grid.y, at most 65535 of them: N = 65535 * 64 + 1 is refused at launch, and
    # int8_gemm returns the launch's error (cudaErrorInvalidConfiguration) instead of success. (The
    # cuda backend declines such N, effops.ops.int8_gemm.CUDA_MAX_N, so the next backend runs it.)
    rng = np.random.default_rng(6)
    N = 65535 * 64 + 1
    case = int8_case(os.path.join(emu_dir, "grid_limit"), rand_i8(rng, 1, 1), rand_i8(rng, 1, N), True, INT32)
    (err, launches), = run(int8_exe, [case["dir"]])
    assert (err, launches) == (9, [])  # cudaErrorInvalidConfiguration
