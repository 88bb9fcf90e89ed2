// Torch glue for the CPU dwpw_conv2d kernels (csrc/cpu/dwpw_conv2d.h): layout, weight packing, dtype
// dispatch. The op (csrc/bindings/dwpw_conv2d_op.cpp) has checked the arguments; these take any
// strides (channels-last or NCHW inputs are read as they are, others copied to NCHW). The forward
// returns x's layout (channels-last or NCHW), the backward returns grad_x in x's layout too.
#include "bindings/dwpw_conv2d_kernel.h"

#include <ATen/ATen.h>

#include "cpu/dwpw_conv2d.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#define EFFOPS_DISPATCH_FLOAT(TYPE, NAME, ...)                                                      \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                         \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)                  \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace {

using effops::cpu::dwpw::Shape;
constexpr int64_t kNr = 16;  // the micro-kernel's column block

// The op's check_args (dwpw_conv2d_op.cpp) has checked what is asserted here; its policy sends
// kernels larger than 7x7 to the ATen route.
Shape make_shape(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight, at::IntArrayRef stride,
                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t act) {
  TORCH_INTERNAL_ASSERT_DEBUG_ONLY(x.dim() == 4 && dw_weight.dim() == 4 && pw_weight.dim() == 4);
  TORCH_INTERNAL_ASSERT_DEBUG_ONLY(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2);
  TORCH_INTERNAL_ASSERT_DEBUG_ONLY(act >= 0 && act <= 5);
  Shape s{};
  s.N = x.size(0), s.C = x.size(1), s.H = x.size(2), s.W = x.size(3), s.O = pw_weight.size(0);
  s.KH = dw_weight.size(2), s.KW = dw_weight.size(3);
  s.SH = stride[0], s.SW = stride[1], s.PH = padding[0], s.PW = padding[1], s.DH = dilation[0], s.DW = dilation[1];
  s.OH = (s.H + 2 * s.PH - s.DH * (s.KH - 1) - 1) / s.SH + 1;
  s.OW = (s.W + 2 * s.PW - s.DW * (s.KW - 1) - 1) / s.SW + 1;
  s.act = static_cast<int>(act);
  TORCH_INTERNAL_ASSERT_DEBUG_ONLY(dw_weight.size(0) == s.C && pw_weight.size(1) == s.C);
  TORCH_INTERNAL_ASSERT_DEBUG_ONLY(s.KH <= 8 && s.KW <= 8);
  TORCH_INTERNAL_ASSERT_DEBUG_ONLY(s.OH > 0 && s.OW > 0 && s.SH > 0 && s.SW > 0 && s.DH > 0 && s.DW > 0);
  return s;
}

// [C, 1, KH, KW] -> [KH*KW][C] fp32: the channels of one tap are contiguous for vector loads.
at::Tensor pack_depthwise(const at::Tensor& w) { return w.reshape({w.size(0), -1}).t().contiguous().to(at::kFloat); }

// [R, K] -> [ceil(R/16)][K][16] fp32, zero-padded past R: one 16-column block of the micro-kernel's B.
at::Tensor pack_columns(const at::Tensor& w2d) {
  const int64_t R = w2d.size(0), K = w2d.size(1), Rp = (R + kNr - 1) / kNr * kNr;
  at::Tensor padded = at::zeros({Rp, K}, w2d.options().dtype(at::kFloat));
  padded.narrow(0, 0, R).copy_(w2d);
  return padded.view({Rp / kNr, kNr, K}).permute({0, 2, 1}).contiguous();
}

// [O, C] bf16 -> [ceil(O/16)][ceil(C/2)][16][2] bf16, zero-padded past O and C: each 32-bit word holds
// the weights of channels 2k and 2k + 1 of one output, the B operand of vdpbf16ps (dwpw_conv2d.h).
at::Tensor pack_bf16_pairs(const at::Tensor& w2d) {
  // One pass over the weight (a padded copy and a permuted copy measured 30% of the forward at
  // 8 x 512 -> 512 @7, where the packing runs on every call).
  const at::Tensor w = w2d.to(at::kBFloat16).contiguous();
  const int64_t R = w.size(0), K = w.size(1), P = (R + kNr - 1) / kNr, K2 = (K + 1) / 2;
  at::Tensor packed = at::empty({P, K2, kNr, 2}, w.options());
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w.data_ptr());
  uint16_t* dst = reinterpret_cast<uint16_t*>(packed.data_ptr());
  for (int64_t p = 0; p < P; ++p)
    for (int64_t k = 0; k < K2; ++k)
      for (int64_t j = 0; j < kNr; ++j) {
        const int64_t r = p * kNr + j, c = 2 * k;
        uint16_t* d = dst + ((p * K2 + k) * kNr + j) * 2;
        d[0] = r < R ? src[r * K + c] : 0;
        d[1] = r < R && c + 1 < K ? src[r * K + c + 1] : 0;
      }
  return packed;
}

at::Tensor optional_float(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous().to(at::kFloat) : at::Tensor();
}

// A fresh large allocation is mmapped by malloc: every 4 KB page faults on first touch and is zeroed
// by the kernel. Measured here (1 thread, CPU time): 33 ms to first-write a fresh 51 MB tensor vs 4 ms
// for a reused one, more than the fused kernel's whole arithmetic at batch 32. Transparent huge
// pages (THP "madvise" mode on this machine) cut that to 9 ms: one fault per 2 MB. Call this on an
// output before the kernel writes it; harmless for memory malloc reuses (the advice only changes how
// untouched or collapsible pages are backed). torch does the same with THP_MEM_ALLOC_ENABLE=1.
void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  if (t.nbytes() < 4 * kHuge) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr()), n = t.nbytes();
  const uintptr_t a = (p + kHuge - 1) & ~(kHuge - 1), e = (p + n) & ~(kHuge - 1);
  if (e > a) madvise(reinterpret_cast<void*>(a), e - a, MADV_HUGEPAGE);  // advice only: errors ignored
#endif
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

}  // namespace

namespace effops::bindings {

at::Tensor dwpw_forward_cpu(const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
                   const std::optional<at::Tensor>& dw_bias, const std::optional<at::Tensor>& pw_bias,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t act) {
  const Shape s = make_shape(x, dw_weight, pw_weight, stride, padding, dilation, act);
  // The output takes x's layout. A channels-last x is read as it is; any other x is read as NCHW
  // (a copy only when it is not NCHW-contiguous) and y is written plane by plane.
  const bool nchw = !x.is_contiguous(at::MemoryFormat::ChannelsLast) || x.is_contiguous();
  const at::Tensor xc = nchw ? x.contiguous() : x;
  const at::Tensor dw = pack_depthwise(dw_weight), db = optional_float(dw_bias), pb = optional_float(pw_bias);
  // The bf16 pairs replace the fp32 panels where the kernel takes them: only one of the two is packed.
  const at::Tensor pairs = x.scalar_type() == at::kBFloat16 && effops::cpu::dwpw::forward_takes_bf16_pairs(nchw)
                               ? pack_bf16_pairs(pw_weight.reshape({s.O, s.C}))
                               : at::Tensor();
  const at::Tensor pw = pairs.defined() ? at::Tensor() : pack_columns(pw_weight.reshape({s.O, s.C}));
  at::Tensor y = at::empty({s.N, s.O, s.OH, s.OW},
                           x.options().memory_format(nchw ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast));
  advise_huge_pages(y);
  EFFOPS_DISPATCH_FLOAT(x.scalar_type(), "dwpw_conv2d_cpu", [&] {
    effops::cpu::dwpw::forward<scalar_t>(s, xc.data_ptr<scalar_t>(), dw.data_ptr<float>(), ptr_or_null(db),
                                         ptr_or_null(pw), ptr_or_null(pb), y.data_ptr<scalar_t>(), nchw,
                                         pairs.defined() ? static_cast<const uint32_t*>(pairs.data_ptr()) : nullptr);
  });
  return y;
}

// needs: bit i set = gradient i wanted (x, dw_weight, pw_weight, dw_bias, pw_bias); others come back empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dwpw_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& dw_weight, const at::Tensor& pw_weight,
    const std::optional<at::Tensor>& dw_bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t act, int64_t needs) {
  const Shape s = make_shape(x, dw_weight, pw_weight, stride, padding, dilation, act);
  TORCH_CHECK(grad_y.dim() == 4 && grad_y.size(0) == s.N && grad_y.size(1) == s.O && grad_y.size(2) == s.OH &&
                  grad_y.size(3) == s.OW && grad_y.scalar_type() == x.scalar_type(),
              "grad_y does not match the output");
  // x and grad_y are read as they are when channels-last, else as NCHW (copied only when neither);
  // grad_x is written in x's layout and dtype.
  const auto nchw = [](const at::Tensor& t) { return !t.is_contiguous(at::MemoryFormat::ChannelsLast) || t.is_contiguous(); };
  const bool x_nchw = nchw(x), gy_nchw = nchw(grad_y);
  const at::Tensor xc = x_nchw ? x.contiguous() : x, gyc = gy_nchw ? grad_y.contiguous() : grad_y;
  const at::Tensor dw = pack_depthwise(dw_weight), db = optional_float(dw_bias);
  // The bf16 pairs replace the fp32 panels where the kernel takes them (as in the forward).
  const at::Tensor pairsT = x.scalar_type() == at::kBFloat16 && effops::cpu::dwpw::backward_takes_bf16_pairs()
                                ? pack_bf16_pairs(pw_weight.reshape({s.O, s.C}).t())
                                : at::Tensor();
  const at::Tensor pwT = pairsT.defined() ? at::Tensor() : pack_columns(pw_weight.reshape({s.O, s.C}).t());
  const auto f32 = x.options().dtype(at::kFloat);
  const auto want = [&](int i) { return (needs >> i) & 1; };
  at::Tensor gx;
  if (want(0)) {
    gx = at::empty({s.N, s.C, s.H, s.W},
                   x.options().memory_format(x_nchw ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast));
    advise_huge_pages(gx);  // written once by the kernel (no zeroing)
  }
  at::Tensor g_dw = want(1) ? at::empty({s.KH * s.KW, s.C}, f32) : at::Tensor();
  at::Tensor g_pw = want(2) ? at::empty({s.O, s.C}, f32) : at::Tensor();
  at::Tensor g_dwb = want(3) ? at::empty({s.C}, f32) : at::Tensor();
  at::Tensor g_pwb = want(4) ? at::empty({s.O}, f32) : at::Tensor();
  auto mut = [](at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
  EFFOPS_DISPATCH_FLOAT(x.scalar_type(), "dwpw_conv2d_backward_cpu", [&] {
    effops::cpu::dwpw::backward<scalar_t>(s, xc.data_ptr<scalar_t>(), x_nchw, gyc.data_ptr<scalar_t>(), gy_nchw,
                                          dw.data_ptr<float>(), ptr_or_null(db), ptr_or_null(pwT),
                                          gx.defined() ? gx.data_ptr<scalar_t>() : nullptr, mut(g_dw), mut(g_pw),
                                          mut(g_dwb), mut(g_pwb),
                                          pairsT.defined() ? static_cast<const uint32_t*>(pairsT.data_ptr()) : nullptr);
  });
  const auto dt = x.scalar_type();
  const auto out = [&](const at::Tensor& t) { return t.defined() ? t.to(dt) : at::empty({0}, x.options()); };
  return {gx.defined() ? gx : at::empty({0}, x.options()), g_dw.defined() ? out(g_dw.t().reshape(dw_weight.sizes())) : out(g_dw),
          g_pw.defined() ? out(g_pw.view(pw_weight.sizes())) : out(g_pw), out(g_dwb), out(g_pwb)};
}

}  // namespace effops::bindings
