// effops::masked_linear: y = F.linear(x, weight * mask, bias) touching only the kept weights, and its
// backward (the weight gradient masked). Schema, argument checks, the policy per device, the routes
// (our CPU kernels, the Triton launchers registered from Python, the plain ATen route), and the CPU,
// CUDA, Meta, Autograd and Autocast registrations.
//
// index (optional): masked_linear_index(mask), a module's state built when its mask is set. Without it
// the op builds what the chosen route needs from the mask on each call: the summary (block size,
// density) in one scan of the mask, and the lists the chosen kernel walks.
// packed (optional, with index): masked_linear_pack(weight, index), the kept weights in the CPU forward
// kernel's layout, which a module builds for inference when asked (SparseLinear.pack_weights). The
// forward reads it instead of the weight: it must come from the weight as it is now.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <sstream>
#include <tuple>

#include "bindings/arg_text.h"
#include "bindings/dispatch.h"
#include "bindings/masked_linear_index.h"
#include "bindings/masked_linear_kernels.h"

namespace effops::masked {
namespace {

using dispatch::Backend;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using OptIndex = std::optional<at::TensorList>;
using OptTensor = std::optional<at::Tensor>;
using effops::bindings::dtype_name;
using effops::bindings::shape_str;

bool is_float(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// ---------------------------------------------------------------------------------------------------
// Argument checks: ValueError / TypeError naming the argument.
// ---------------------------------------------------------------------------------------------------
void check_same_device(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " must be on ", x.device(), " like the input, got ", t.device());
}

void check_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dims, got shape ", shape_str(x.sizes()));
  TORCH_CHECK_TYPE(is_float(x.scalar_type()), "x must have dtype in (float32, bfloat16, float16), got ",
                   dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D, got shape ", shape_str(weight.sizes()));
  check_same_device("weight", weight, x);
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "weight must have dtype ", dtype_name(x.scalar_type()),
                   " like the input, got ", dtype_name(weight.scalar_type()));
  check_same_device("mask", mask, x);
  TORCH_CHECK_VALUE(mask.sizes() == weight.sizes(), "mask must have shape ", shape_str(weight.sizes()), ", got ",
                    shape_str(mask.sizes()));
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool || mask.scalar_type() == weight.scalar_type(),
                   "mask must be bool or have weight's dtype ", dtype_name(weight.scalar_type()), ", got ",
                   dtype_name(mask.scalar_type()));
  TORCH_CHECK_VALUE(x.size(-1) == weight.size(1), "x's last dim must equal weight's in_features ", weight.size(1),
                    ", got shape ", shape_str(x.sizes()));
  if (bias.has_value() && bias->defined()) {
    check_same_device("bias", *bias, x);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must have shape (", weight.size(0),
                      ",), got ", shape_str(bias->sizes()));
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "bias must have dtype ", dtype_name(x.scalar_type()),
                     " like the input, got ", dtype_name(bias->scalar_type()));
  }
}

// A float mask holds only 0 and 1 (a bool mask cannot hold anything else).
void check_binary(const at::Tensor& mask) {
  if (mask.scalar_type() == at::kBool || mask.numel() == 0) return;
  double found = 0;
  if (mask.is_cpu()) {
    TORCH_CHECK_VALUE(holds_only_zeros_and_ones(mask, &found), "mask must hold only 0 and 1 (or be bool), found ",
                      found);
    return;
  }
  const at::Tensor bad = mask.ne(0).logical_and(mask.ne(1));
  if (!bad.any().item<bool>()) return;
  found = mask.masked_select(bad).flatten()[0].item<double>();
  TORCH_CHECK_VALUE(false, "mask must hold only 0 and 1 (or be bool), found ", found);
}

// ---------------------------------------------------------------------------------------------------
// Policy. Each rule with the measurement that set it; the reasons reach the user only through forcing.
// ---------------------------------------------------------------------------------------------------
// CPU: the highest density at which each kernel still beats dense F.linear, and the smallest product
// (rows x out x in multiply-adds) worth the mask scan and the packing. Measured on 2-core machines,
// set on the safe side:
// - kDefault (fp32, fp16; bf16 where torch's bf16 GEMM is not native): fp32 at the avx2 level (Zen 3),
//   density sweeps of the forced cpu backend against F.linear. Block kernel forward / forward+backward:
//   256 x 4096 x 4096 at 50% density 2.0-2.3x / 1.6x, at 70% 1.3-1.5x / 1.2-1.3x; 2048 rows at 75%
//   1.1-1.4x / 0.85-1.3x. CSR 1.7x at 10% and even at 20-25%; products under ~8M MACs at best even.
//   The CSR kernel vectorises over 64 batch rows: 0.25x dense at 1 row, 1.96x at 32. At the avx512
//   level both kernels and torch's fp32 GEMM are faster; the table holds there
//   (benchmarks/bench_masked_linear.py runs every level).
// - kBf16Native (bf16 where torch's bf16 F.linear runs natively, ~2.8x its fp32): at avx512_bf16
//   (Zen 4), benchmarks/masked_bf16_crossover.py: block-32 forward / forward+backward 1.8x /
//   1.05-1.8x at 30%, 1.2-1.4x / 0.93-1.46x at 45%. CSR with its vdpbf16ps body (avx512_bf16 level,
//   Zen 5, `--cpu-time`: one thread, the mask scanned per call), forward against torch's bf16 F.linear
//   on the masked weight made ahead: 4096x4096 / 2048x2048 at 256 rows 1.35x / 1.33x at 5%, 1.10x /
//   1.15x at 8%, 0.97x at 10% (4096); at 128 rows 1.09x / 1.09x at 5%, 1.04x / 1.03x at 6%, 0.95x /
//   0.96x at 8%; at 64 rows 0.79-0.85x at every density (3-10%); at 2048 rows 2.3x at 5%, 1.5x at 10%.
//   Forward+backward 1.1-2.5x wherever the forward wins. Hence 6% and at least 128 rows. Given the
//   index (no mask scan: SparseLinear) the forward wins further: 1.22x / 1.39x / 1.23x at 10% (4096 at
//   256 rows, 2048 at 128, 4096 at 64), 0.97x / 1.09x / 1.10x at 15%; with packed weights too
//   (SparseLinear.pack_weights) 1.47x / 1.78x / 1.83x at 10%, 1.10x / 1.35x / 1.39x at 15%,
//   0.86x / 1.02x / 1.16x at 20% (benchmarks/masked_bf16_rows.py); 64 rows at 12% / 15%: index 1.14x /
//   1.01x (4096), 1.21x / 1.20x (2048), packed 1.65x / 1.38x, 1.91x / 1.54x; 32 rows lose given the index
//   alone at 12% (0.76-0.94x) and with packed weights at 15% (0.92x). Hence 12% / 15% from 64 rows for
//   those forwards; the backward keeps the first tier (its kernels read fp32 spans).
// The CSR tiers, by what the call is given: the mask alone (scanned on every call), its index, or the
// index and packed weights (forward only).
enum Given { kMaskOnly = 0, kIndexGiven = 1, kPackedGiven = 2 };
struct CpuLimits {
  double block_max_density, csr_max_density[3];
  int64_t csr_min_rows[3], min_macs;
};
constexpr CpuLimits kDefault{0.6, {0.15, 0.15, 0.15}, {32, 32, 32}, int64_t{1} << 23};
constexpr CpuLimits kBf16Native{0.3, {0.06, 0.12, 0.15}, {128, 64, 64}, int64_t{1} << 23};

const CpuLimits& cpu_limits(at::ScalarType dtype) {
  return dtype == at::kBFloat16 && dispatch::torch_bf16_is_native() ? kBf16Native : kDefault;
}

// Why dense F.linear is faster for this product, or nullptr. Reads the index's summary only when the
// product is large enough to ask (`index` described on first need).
template <class Describe>
const char* cpu_slower(int64_t rows, int64_t N, int64_t K, at::ScalarType dtype, Given given, Describe&& describe) {
  const CpuLimits& limits = cpu_limits(dtype);
  if (rows * N * K < limits.min_macs) return "product too small: dense F.linear is faster";
  const Index& index = describe();
  if (!index.block && rows < limits.csr_min_rows[given])
    return "too few rows for the CSR kernel to beat dense F.linear";
  if (index.density() > (index.block ? limits.block_max_density : limits.csr_max_density[given]))
    return "mask too dense for the sparse kernels to beat dense F.linear";
  return nullptr;
}

// CUDA (Triton): chosen only where the kernels should beat cuBLAS, block masks up to 50% dense. Not yet
// measured on a GPU: the unstructured / 2:4 kernels do dense FLOPs and are left to forcing.
const char* triton_slower(const Index& index) {
  if (!index.block) return "unstructured / 2:4 Triton kernels are not chosen automatically (no GPU crossover measured)";
  if (index.density() > 0.5) return "block mask over 50% dense: cuBLAS on W * mask is expected to be faster";
  return nullptr;
}

// The Triton kernels index with int32 element offsets.
const char* triton_cannot(int64_t rows, int64_t N, int64_t K) {
  const int64_t limit = int64_t{1} << 31;
  if (rows * K >= limit || rows * N >= limit || N * K >= limit)
    return "tensors of 2**31 elements or more (int32 offsets in the Triton kernels)";
  return nullptr;
}

// ---------------------------------------------------------------------------------------------------
// Shapes
// ---------------------------------------------------------------------------------------------------
int64_t rows_of(const at::Tensor& x) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) rows *= x.size(d);
  return rows;
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t N) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return shape;
}

// A 2-D result as x's leading dims: not a view (as F.linear returns it: a module output that is a view
// breaks in-place use under FSDP2).
at::Tensor with_leading_dims(const at::Tensor& y, const at::Tensor& x) {
  return x.dim() == 2 ? y : at::_unsafe_view(y, out_shape(x, y.size(-1)));
}

// The index this call walks: the given one, or the mask's summary built now (lists added on need).
struct CallIndex {
  const at::Tensor& mask;
  OptIndex given;
  std::optional<Index> index;
  const Index& get() {
    if (!index) index = given.has_value() ? from_list(*given, mask) : describe(mask);
    return *index;
  }
  Index& rows() {
    get();
    build_rows(*index, mask);
    return *index;
  }
  Index& all() {
    rows();
    build_cols(*index, mask);
    return *index;
  }
};

// ---------------------------------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------------------------------
// The plain ATen route: the reference's arithmetic (effops/reference/masked_linear.py).
// W * mask is made in slices of at most kSliceBytes: a fresh allocation above glibc's mmap threshold
// (32 MB) page-faults and is zeroed on every call (4096 x 4096 fp32: 30 ms of a 120 ms call, one thread),
// while slices below it reuse freed memory. Each slice's product lands in its columns of y.
constexpr int64_t kSliceBytes = int64_t{8} << 20;

at::Tensor aten_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                        const std::optional<at::Tensor>& bias) {
  const at::Tensor w = weight.contiguous(), m = mask.contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  const int64_t slice = std::max<int64_t>(1, kSliceBytes / std::max<int64_t>(1, K * w.element_size()));
  if (N <= slice || !w.is_cpu()) return at::linear(x, masked_weight(w, m, false), bias);
  const int64_t rows = rows_of(x);
  const at::Tensor x2 = x.reshape({rows, K});
  at::Tensor y = at::empty({rows, N}, x.options());
  const bool has_bias = bias.has_value() && bias->defined();
  for (int64_t n0 = 0; n0 < N; n0 += slice) {
    const int64_t n = std::min(slice, N - n0);
    const at::Tensor part = masked_weight(w.narrow(0, n0, n), m.narrow(0, n0, n), false);
    y.narrow(1, n0, n).copy_(has_bias ? at::addmm(bias->narrow(0, n0, n), x2, part.t()) : at::mm(x2, part.t()));
  }
  return with_leading_dims(y, x);
}

Grads aten_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                    std::array<bool, 3> need) {
  const int64_t rows = rows_of(x), N = weight.size(0), K = weight.size(1);
  const at::Tensor g2 = grad_y.reshape({rows, N}), m = mask.contiguous();
  at::Tensor gx, gw, gb;
  if (need[0]) gx = at::mm(g2, masked_weight(weight.contiguous(), m, false)).reshape(x.sizes());
  if (need[1]) gw = masked_weight(at::mm(g2.t(), x.reshape({rows, K})), m, true);
  if (need[2]) gb = g2.sum(0);
  return {gx, gw, gb};
}

// The kept weights in the forward kernel's layout: block panels, or the CSR values.
at::Tensor pack(const at::Tensor& w, const Index& index) {
  return index.block ? block_pack(w, index.rows_ptr, index.rows_idx, index.block, false)
                     : gather_values(w, index.rows_ptr, index.rows_idx, false);
}

at::Tensor cpu_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const OptTensor& packed, CallIndex& call) {
  const int64_t M = rows_of(x), N = weight.size(0), K = weight.size(1);
  const bool has_bias = bias.has_value() && bias->defined();
  if (M == 0 || N == 0 || K == 0) {  // nothing to walk: the bias (or zeros) in the output's shape
    at::Tensor y = at::zeros({M, N}, x.options());
    if (has_bias) y.add_(*bias);
    return with_leading_dims(y, x);
  }
  const at::Tensor x2 = x.reshape({M, K}).contiguous(), w = weight.contiguous();
  const std::optional<at::Tensor> b = has_bias ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  Index& index = call.rows();
  // The kernels read the weight itself (packing or gathering each row's kept weights as they reach it),
  // or the packed weights when given.
  const OptTensor kept = packed.has_value() && packed->defined() ? packed : std::nullopt;
  at::Tensor y;
  if (index.block) {
    y = block_mm(x2, w, false, kept, b, index.rows_ptr, index.rows_idx, index.block);
  } else {
    y = csr_mm(spanned_t(x2, true, 0, csr_bf16_spans(x2.scalar_type(), M)), M, w, b, index.rows_ptr,
               index.rows_idx, false, kept);
  }
  return with_leading_dims(y, x);
}

Grads cpu_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, std::array<bool, 3> need,
                   CallIndex& call) {
  const int64_t M = rows_of(x), N = weight.size(0), K = weight.size(1);
  at::Tensor gx, gw, gb;
  if (M == 0 || N == 0 || K == 0) {
    if (need[0]) gx = at::zeros(x.sizes(), x.options());
    if (need[1]) gw = at::zeros(weight.sizes(), weight.options());
    if (need[2]) gb = grad_y.reshape({M, N}).sum(0);
    return {gx, gw, gb};
  }
  const at::Tensor g2 = grad_y.reshape({M, N}).contiguous(), x2 = x.reshape({M, K}).contiguous();
  const at::Tensor w = weight.contiguous();
  Index& index = need[0] ? call.all() : call.rows();
  if (index.block) {
    if (need[0])
      gx = block_mm(g2, w, true, std::nullopt, std::nullopt, index.cols_ptr, index.cols_idx, index.block)
               .reshape(x.sizes());
    if (need[1]) gw = block_grad_weight(g2, x2, index.rows_ptr, index.rows_idx, index.block);
  } else {
    at::Tensor gT;
    if (need[1] || (need[0] && M > 4)) gT = spanned_t(g2, false, std::max(N, K));
    if (need[0]) {
      const at::Tensor vals = gather_values(w, index.cols_ptr, index.cols_idx, true);
      gx = csr_mm(M <= 4 ? spanned_t(g2, true, 0) : gT, M, w, std::nullopt, index.cols_ptr, index.cols_idx, true, vals)
               .reshape(x.sizes());
    }
    if (need[1])
      gw = csr_grad_weight(gT, spanned_t(x2, false, std::max(N, K)), index.rows_ptr, index.rows_idx,
                           weight.scalar_type());
  }
  if (need[2]) gb = g2.sum(0);
  return {gx, gw, gb};
}

// The Triton launchers, registered from effops/ops/masked_linear.py (they exist once it is imported).
using TritonForward = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const std::optional<at::Tensor>&, at::TensorList);
using TritonBackward = Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             at::TensorList, bool, bool, bool);

at::Tensor triton_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                          const std::optional<at::Tensor>& bias, CallIndex& call) {
  const std::vector<at::Tensor> index = to_list(call.all(), mask);
  return dispatch::python_route<TritonForward>("effops::_masked_linear_triton").call(x, weight, mask, bias, index);
}

Grads triton_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                      std::array<bool, 3> need, CallIndex& call) {
  const std::vector<at::Tensor> index = to_list(call.all(), mask);
  auto [gx, gw, gb] = dispatch::python_route<TritonBackward>("effops::_masked_linear_backward_triton")
                          .call(grad_y, x, weight, mask, index, need[0], need[1], need[2]);
  // (a Python op cannot return None: an unneeded gradient comes back as an empty tensor)
  return {need[0] ? gx : at::Tensor(), need[1] ? gw : at::Tensor(), need[2] ? gb : at::Tensor()};
}

// ---------------------------------------------------------------------------------------------------
// Device implementations
// ---------------------------------------------------------------------------------------------------
// The route of one call on `device`, forcing included; a forced backend that cannot run raises.
// given: what the CPU speed rule may count on (the forward's index and packed weights).
Backend route(c10::DeviceType device, const at::Tensor& x, const at::Tensor& weight, CallIndex& call, Given given) {
  const int64_t rows = rows_of(x), N = weight.size(0), K = weight.size(1);
  Backend chosen;
  if (device == c10::DeviceType::CPU) {
    const bool forced = dispatch::forced_backend() != Backend::kAuto;
    // (forced, the speed rule does not apply: no need to scan the mask for it)
    const char* slower = forced ? nullptr : cpu_slower(rows, N, K, x.scalar_type(), given, [&]() -> const Index& {
      return call.get();
    });
    chosen = dispatch::choose("masked_linear", device, Backend::kCpu, nullptr, slower);
  } else {
    const char* cannot = triton_cannot(rows, N, K);
    const char* slower = cannot || rows == 0 ? nullptr : triton_slower(call.get());
    chosen = dispatch::choose("masked_linear", device, Backend::kTriton, cannot, slower);
    TORCH_CHECK_NOT_IMPLEMENTED(chosen != Backend::kCuda, "backend 'cuda' is forced but has no kernel for masked_linear");
  }
  if (chosen == Backend::kTriton) {
    const char* cannot = triton_cannot(rows, N, K);
    TORCH_CHECK_NOT_IMPLEMENTED(cannot == nullptr, "backend 'triton' is forced but declines this masked_linear input: ",
                                cannot);
  }
  return chosen;
}

// packed must be what masked_linear_pack(weight, index) gives for this weight and index.
void check_packed(const OptTensor& packed, const at::Tensor& weight, CallIndex& call) {
  if (!packed.has_value() || !packed->defined()) return;
  TORCH_CHECK_VALUE(call.given.has_value(), "packed needs the index it was packed with");
  const Index& index = call.get();
  const at::ScalarType dtype =
      index.block && weight.scalar_type() != at::kBFloat16 ? at::kFloat : weight.scalar_type();
  const int64_t kept = index.block ? index.rows_idx.numel() * index.block * index.block : index.rows_idx.numel();
  TORCH_CHECK_VALUE(packed->scalar_type() == dtype && packed->numel() == kept && packed->is_contiguous() &&
                        packed->device() == weight.device(),
                    "packed does not fit this weight and index: build it with masked_linear_pack(weight, index)");
}

at::Tensor masked_linear_impl(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                              const std::optional<at::Tensor>& bias, OptIndex index, const OptTensor& packed) {
  check_args(x, weight, mask, bias);
  check_binary(mask);
  CallIndex call{mask, index, std::nullopt};
  if (index.has_value()) call.get();  // a given index is checked against the mask whichever route runs
  check_packed(packed, weight, call);
  const Given given = packed.has_value() && packed->defined() ? kPackedGiven
                      : index.has_value()                     ? kIndexGiven
                                                              : kMaskOnly;
  switch (route(x.device().type(), x, weight, call, given)) {
    case Backend::kCpu: return cpu_forward(x, weight, bias, packed, call);
    case Backend::kTriton: return triton_forward(x, weight, mask, bias, call);
    default: return aten_forward(x, weight, mask, bias);
  }
}

Grads masked_linear_backward_impl(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& mask, OptIndex index, std::array<bool, 3> need) {
  check_args(x, weight, mask, std::nullopt);
  TORCH_CHECK_VALUE(grad_y.sizes() == at::IntArrayRef(out_shape(x, weight.size(0))), "grad_y must have shape ",
                    shape_str(out_shape(x, weight.size(0))), ", got ", shape_str(grad_y.sizes()));
  TORCH_CHECK_TYPE(grad_y.scalar_type() == x.scalar_type(), "grad_y must have dtype ", dtype_name(x.scalar_type()),
                   " like the input, got ", dtype_name(grad_y.scalar_type()));
  check_same_device("grad_y", grad_y, x);
  CallIndex call{mask, index, std::nullopt};
  switch (route(x.device().type(), x, weight, call, kMaskOnly)) {
    case Backend::kCpu: return cpu_backward(grad_y, x, weight, need, call);
    case Backend::kTriton: return triton_backward(grad_y, x, weight, mask, need, call);
    default: return aten_backward(grad_y, x, weight, mask, need);
  }
}

at::Tensor masked_linear_meta(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                              const std::optional<at::Tensor>& bias, OptIndex, const OptTensor&) {
  check_args(x, weight, mask, bias);
  return at::empty(out_shape(x, weight.size(0)), x.options());
}

Grads masked_linear_backward_meta(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& mask, OptIndex, std::array<bool, 3> need) {
  check_args(x, weight, mask, std::nullopt);
  return {need[0] ? at::empty_like(x) : at::Tensor(), need[1] ? at::empty_like(weight) : at::Tensor(),
          need[2] ? at::empty({weight.size(0)}, x.options()) : at::Tensor()};
}

std::vector<at::Tensor> masked_linear_index(const at::Tensor& mask) {
  TORCH_CHECK_VALUE(mask.dim() == 2, "mask must be 2-D, got shape ", shape_str(mask.sizes()));
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool || is_float(mask.scalar_type()),
                   "mask must be bool or 0/1 floats, got ", dtype_name(mask.scalar_type()));
  check_binary(mask);
  Index index = describe(mask);
  build_rows(index, mask);
  build_cols(index, mask);
  return to_list(index, mask);
}

// Why the automatic choice runs plain ATen for these shapes and dtype on `device` ("cpu" or "cuda"), or ""
// where it runs our kernels (tests of the policy; x and weight may be meta tensors, the mask is read).
std::string route_reason(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                         const std::string& device) {
  TORCH_CHECK_VALUE(device == "cpu" || device == "cuda", "device must be 'cpu' or 'cuda', got '", device, "'");
  const int64_t rows = rows_of(x), N = weight.size(0), K = weight.size(1);
  CallIndex call{mask, std::nullopt, std::nullopt};
  const char* why;
  if (device == "cpu") {
    why = cpu_slower(rows, N, K, x.scalar_type(), kMaskOnly, [&]() -> const Index& { return call.get(); });
  } else {
    why = triton_cannot(rows, N, K);
    if (why == nullptr && rows > 0) why = triton_slower(call.get());
  }
  return why == nullptr ? "" : why;
}

at::Tensor masked_linear_pack(const at::Tensor& weight, at::TensorList index_list) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D, got shape ", shape_str(weight.sizes()));
  TORCH_CHECK_TYPE(is_float(weight.scalar_type()), "weight must have dtype in (float32, bfloat16, float16), got ",
                   dtype_name(weight.scalar_type()));
  TORCH_CHECK_VALUE(weight.is_cpu(), "masked_linear_pack packs for the CPU kernels, got weight on ", weight.device());
  // (from_list checks the index against a mask of the weight's shape and device; its values are not read)
  const Index index = from_list(index_list, at::empty(weight.sizes(), weight.options().dtype(at::kBool)));
  return pack(weight.contiguous(), index);
}

// ---------------------------------------------------------------------------------------------------
// Autograd and autocast
// ---------------------------------------------------------------------------------------------------
using ForwardSignature = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                    OptIndex, const OptTensor&);

c10::TypedOperatorHandle<ForwardSignature> forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("effops::masked_linear", "").typed<ForwardSignature>();
  return op;
}

c10::TypedOperatorHandle<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, OptIndex,
                               std::array<bool, 3>)>
backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("effops::masked_linear_backward", "")
                             .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          OptIndex, std::array<bool, 3>)>();
  return op;
}

class MaskedLinearFunction : public torch::autograd::Function<MaskedLinearFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& mask, const std::optional<at::Tensor>& bias, OptIndex index,
                            const OptTensor& packed) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({x, weight, mask});
    ctx->saved_data["forced_backend"] = static_cast<int64_t>(effops::dispatch::forced_on_this_thread());
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    if (index.has_value()) ctx->saved_data["index"] = c10::List<at::Tensor>(index->vec());
    return forward_op().call(x, weight, mask, bias, index, packed);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const effops::dispatch::ForwardBackendGuard forward_backend(ctx->saved_data["forced_backend"].toInt());
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &mask = saved[2];
    const at::Tensor& grad_y = grad_outputs[0];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const std::array<bool, 3> need{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   has_bias && ctx->needs_input_grad(3)};
    std::vector<at::Tensor> index_list;
    OptIndex index;
    if (ctx->saved_data.count("index")) {
      index_list = ctx->saved_data["index"].toTensorVector();
      index = at::TensorList(index_list);
    }
    at::Tensor gx, gw, gb, gmask;
    if (need[0] || need[1] || need[2]) std::tie(gx, gw, gb) = backward_op().call(grad_y, x, weight, mask, index, need);
    if (ctx->needs_input_grad(2)) {
      // A float mask that requires grad (a learned mask): torch's autograd of weight * mask gives
      // (grad_y^T x) * weight, dense.
      const int64_t rows = rows_of(x);
      gmask = (at::mm(grad_y.reshape({rows, weight.size(0)}).t(), x.reshape({rows, weight.size(1)})) * weight)
                  .to(mask.scalar_type());
    }
    return {gx, gw, gmask, gb, at::Tensor(), at::Tensor()};
  }
};

at::Tensor masked_linear_autograd(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                                  const std::optional<at::Tensor>& bias, OptIndex index, const OptTensor& packed) {
  const bool wants_grad = c10::GradMode::is_enabled() &&
                          (x.requires_grad() || weight.requires_grad() || mask.requires_grad() ||
                           (bias.has_value() && bias->defined() && bias->requires_grad()));
  if (!wants_grad) {
    at::AutoDispatchBelowADInplaceOrView below;
    return forward_op().call(x, weight, mask, bias, index, packed);
  }
  return MaskedLinearFunction::apply(x, weight, mask, bias, index, packed);
}

// As torch casts F.linear: the floating inputs to the autocast dtype (a bool mask stays bool).
template <c10::DeviceType D>
at::Tensor masked_linear_autocast(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask,
                                  const std::optional<at::Tensor>& bias, OptIndex index, const OptTensor& packed) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(D));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(D);
  auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(dtype, t, D); };
  const at::Tensor cast_mask = mask.scalar_type() == at::kBool ? mask : cast(mask);
  const std::optional<at::Tensor> cast_bias =
      bias.has_value() && bias->defined() ? std::optional<at::Tensor>(cast(*bias)) : bias;
  const at::Tensor cast_weight = cast(weight);
  // (packed weights keep the weight's dtype: a cast weight no longer matches them)
  const OptTensor cast_packed = cast_weight.scalar_type() == weight.scalar_type() ? packed : std::nullopt;
  return forward_op().call(cast(x), cast_weight, cast_mask, cast_bias, index, cast_packed);
}

}  // namespace
}  // namespace effops::masked

TORCH_LIBRARY_FRAGMENT(effops, m) {
  m.def("masked_linear(Tensor x, Tensor weight, Tensor mask, Tensor? bias=None, Tensor[]? index=None, "
        "Tensor? packed=None) -> Tensor");
  m.def("masked_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor mask, Tensor[]? index, "
        "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def("masked_linear_index(Tensor mask) -> Tensor[]");
  m.def("masked_linear_pack(Tensor weight, Tensor[] index) -> Tensor");
}

TORCH_LIBRARY_FRAGMENT(effops_cpu, m) {
  m.def("masked_linear_route_reason(Tensor x, Tensor weight, Tensor mask, str device) -> str",
        &effops::masked::route_reason);
}

TORCH_LIBRARY_IMPL(effops, CPU, m) {
  m.impl("masked_linear", &effops::masked::masked_linear_impl);
  m.impl("masked_linear_backward", &effops::masked::masked_linear_backward_impl);
}

TORCH_LIBRARY_IMPL(effops, CUDA, m) {
  m.impl("masked_linear", &effops::masked::masked_linear_impl);
  m.impl("masked_linear_backward", &effops::masked::masked_linear_backward_impl);
}

TORCH_LIBRARY_IMPL(effops, Meta, m) {
  m.impl("masked_linear", &effops::masked::masked_linear_meta);
  m.impl("masked_linear_backward", &effops::masked::masked_linear_backward_meta);
}

TORCH_LIBRARY_IMPL(effops, CompositeExplicitAutograd, m) {
  m.impl("masked_linear_index", &effops::masked::masked_linear_index);
  m.impl("masked_linear_pack", &effops::masked::masked_linear_pack);
}

TORCH_LIBRARY_IMPL(effops, Autograd, m) { m.impl("masked_linear", &effops::masked::masked_linear_autograd); }

TORCH_LIBRARY_IMPL(effops, AutocastCPU, m) {
  m.impl("masked_linear", &effops::masked::masked_linear_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(effops, AutocastCUDA, m) {
  m.impl("masked_linear", &effops::masked::masked_linear_autocast<c10::DeviceType::CUDA>);
}
