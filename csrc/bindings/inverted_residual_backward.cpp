// effops::inverted_residual_backward, and the autograd and autocast of effops::inverted_residual.
//
// The forward saves only x and the weights: the expanded tensor (6x the block's channels) and the
// depthwise output are recomputed in the backward, a chunk of images at a time, and never exist for
// the whole batch. Per chunk, the depthwise middle (d in one pass; then, from d's gradient, the depthwise
// weights' gradients and the gradient at expand's output, both activations' derivatives included) by one of
// two implementations of DepthwiseMiddle: our CPU kernel (csrc/cpu/inverted_residual_depthwise.h; the "cpu"
// route with channels-last x), which reads e = act(expand(x)) computed through torch's ops, or the Triton
// kernels (triton_kernels/inverted_residual_backward.py; the "triton" route), which recompute e per tile from
// x so that it is never in memory; then the two 1x1 convolutions' backward through
// aten::convolution_backward, with the squeeze-excitation's gradients between.
// Routes: "cpu" (CPU tensors, chunks of about kCpuChunkBytes of expanded tensor; other layouts run torch's
// ops for the middle too); "triton" (CUDA tensors automatically, chunks of kCudaChunkBytes; CPU tensors
// only when forced, in Triton's interpreter: tests); "reference" (forced: torch's ops on the whole batch at
// once; on CUDA also where Triton declines the input, then chunked). A forced "cuda" raises: there is no
// CUDA C++ kernel for it. The Triton middle has never run on a GPU.
// The "cpu" route runs the fully fused backward instead (csrc/cpu/inverted_residual_fused_backward.h: the
// 1x1 convolutions' gradients in the same pass, nothing of expanded size in memory) for kernels up to
// 8x8 and at least one image per thread (it runs images in parallel); x of another layout is copied to
// channels-last, as the forward kernel copies it. A squeeze-excitation block takes a first pass for d's
// means and the gate's gradient, the SE's own backward through torch's ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "bindings/dispatch.h"
#include "bindings/inverted_residual.h"
#include "cpu/inverted_residual_depthwise.h"
#include "cpu/inverted_residual_fused_backward.h"

namespace {

using namespace effops::bindings::inverted_residual;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kCpuChunkBytes = 8ll << 20;  // expanded tensor per chunk: L3-sized, below glibc's mmap threshold
// On a GPU the chunk only bounds memory (cuDNN keeps nothing in cache across calls): large enough that
// each convolution call covers many images. Not measured on a GPU.
constexpr int64_t kCudaChunkBytes = 256ll << 20;

at::Tensor activation_backward(const at::Tensor& g, const at::Tensor& h, int act) {
  switch (act) {
    case ir::kRelu: return at::threshold_backward(g, h, 0);
    case ir::kRelu6: return at::hardtanh_backward(g, h, 0, 6);
    case ir::kGelu: return at::gelu_backward(g, h);
    case ir::kSilu: return at::silu_backward(g, h);
    case ir::kHardswish: return at::hardswish_backward(g, h);
    default: return g;
  }
}

constexpr int kInputs = 11;  // x, expand w/b, dw w/b, project w/b, squeeze-excitation reduce w/b and expand w/b
using Needs = std::array<bool, kInputs>;
using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                         at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The squeeze-excitation's own backward: given g_g (the gradient at the gate g, [N, Ch, 1, 1]), adds the
// SE weights' gradients into out[7..10] and returns the gradient at pooled (d's means) when need_pooled.
// In pooled's dtype, as se_gate computes (the fused backward's pooled is fp32 whatever the weights').
at::Tensor se_gate_backward(const Se& se, const at::Tensor& pooled, const SeGate& sg, const at::Tensor& g_g,
                            bool need_pooled, const Needs& needs,
                            const std::function<void(int, const at::Tensor&)>& add) {
  const at::Tensor g_z2 = se.gate == kSigmoid ? at::sigmoid_backward(g_g, sg.g) : at::hardsigmoid_backward(g_g, sg.z2);
  const int64_t squeeze = se.reduce_w->size(0), ch = pooled.size(1);
  const bool need_z1 = need_pooled || needs[7] || needs[8];
  const at::ScalarType dtype = pooled.scalar_type();
  auto [g_a1, g_w2, g_b2] =
      at::convolution_backward(g_z2, sg.a1, se.expand_w->to(dtype), std::vector<int64_t>{ch}, {1, 1}, {0, 0},
                               {1, 1}, false, {0, 0}, 1, {need_z1, needs[9], needs[10]});
  add(9, g_w2), add(10, g_b2);
  if (!need_z1) return at::Tensor();
  const at::Tensor g_z1 = activation_backward(g_a1, sg.z1, se.act);
  auto [g_pooled, g_w1, g_b1] =
      at::convolution_backward(g_z1, pooled, se.reduce_w->to(dtype), std::vector<int64_t>{squeeze}, {1, 1},
                               {0, 0}, {1, 1}, false, {0, 0}, 1, {need_pooled, needs[7], needs[8]});
  add(7, g_w1), add(8, g_b1);
  return need_pooled ? g_pooled : at::Tensor();
}

// Gradients of the squeeze-excitation: given g_ds (the gradient at d * g), returns the gradient at d
// (when need_d) and adds the SE weights' gradients into out[7..10].
at::Tensor se_backward(const Se& se, const at::Tensor& d, const at::Tensor& pooled, const SeGate& sg,
                       const at::Tensor& g_ds, bool need_d, const Needs& needs,
                       const std::function<void(int, const at::Tensor&)>& add) {
  const at::Tensor g_g = (g_ds * d).sum({2, 3}, /*keepdim=*/true);
  const at::Tensor g_pooled = se_gate_backward(se, pooled, sg, g_g, need_d, needs, add);
  if (!need_d) return at::Tensor();
  return g_ds * sg.g + g_pooled / static_cast<double>(d.size(2) * d.size(3));  // the mean's share
}

// The depthwise middle of a chunk's backward: d = act(depthwise(e) + b), and from d's gradient the
// depthwise weight's and bias' gradients and the gradient at pre_e (at x without expansion) with both
// activations' derivatives applied, in one pass for d and one (CPU) or two (Triton) for the gradients, where
// torch's route makes five. Two implementations: our CPU kernel, which reads e and pre_e (chunk_backward
// computes them through torch's ops), and the Triton kernels, which recompute them per tile from x.
class DepthwiseMiddle {
 public:
  virtual ~DepthwiseMiddle() = default;
  // Whether it reads e and pre_e (else they are not computed: undefined tensors).
  virtual bool reads_expanded() const = 0;
  virtual at::Tensor forward(const at::Tensor& x, const at::Tensor& e) const = 0;
  // (the gradient at pre_e or x, in x's dtype; the depthwise weight's and bias' gradients, in dw's dtype)
  virtual std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& g_d, const at::Tensor& x,
                                                                  const at::Tensor& e,
                                                                  const at::Tensor& pre_e) const = 0;
};

// Our CPU kernel (csrc/cpu/inverted_residual_depthwise.h): channels-last tensors of x's dtype, the weights
// as the kernel reads them.
class DepthwiseKernel final : public DepthwiseMiddle {
 public:
  DepthwiseKernel(const ir::Shape& s, const at::Tensor& dw, const OptTensor& db)
      : shape_{s.N, s.Ch, s.H, s.W, s.OH, s.OW, s.KH, s.KW, s.SH, s.SW, s.PH, s.PW, s.act},
        dw_(dw),
        w_taps_(dw.reshape({s.Ch, s.KH * s.KW}).t().to(at::kFloat).contiguous()),
        bias_(given(db) ? db->to(at::kFloat).contiguous() : at::Tensor()) {}

  bool reads_expanded() const override { return true; }

  at::Tensor forward(const at::Tensor&, const at::Tensor& e) const override {
    const at::Tensor ec = e.contiguous(at::MemoryFormat::ChannelsLast);
    const ir::DepthwiseShape s = shape_of(ec);
    at::Tensor d = at::empty({s.N, s.C, s.OH, s.OW}, ec.options(), at::MemoryFormat::ChannelsLast);
    with_storage_type(ec.scalar_type(), [&](auto type) {
      using T = decltype(type);
      ir::depthwise_act_forward<T>(s, ec.const_data_ptr<T>(), w_taps_.const_data_ptr<float>(), b(),
                                   d.mutable_data_ptr<T>());
    });
    return d;
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& g_d, const at::Tensor&,
                                                          const at::Tensor& e,
                                                          const at::Tensor& pre_e) const override {
    const auto cl = at::MemoryFormat::ChannelsLast;
    const at::Tensor gc = g_d.contiguous(cl), ec = e.contiguous(cl);
    const at::Tensor pc = pre_e.defined() ? pre_e.contiguous(cl) : at::Tensor();
    const ir::DepthwiseShape s = shape_of(ec);
    at::Tensor g_in = at::empty_like(ec, cl);
    at::Tensor g_w = at::empty({s.KH * s.KW, s.C}, ec.options().dtype(at::kFloat));
    at::Tensor g_b = at::empty({s.C}, g_w.options());
    with_storage_type(ec.scalar_type(), [&](auto type) {
      using T = decltype(type);
      ir::depthwise_act_backward<T>(s, gc.const_data_ptr<T>(), ec.const_data_ptr<T>(),
                                    pc.defined() ? pc.const_data_ptr<T>() : nullptr, w_taps_.const_data_ptr<float>(),
                                    b(), g_in.mutable_data_ptr<T>(), g_w.mutable_data_ptr<float>(),
                                    g_b.mutable_data_ptr<float>());
    });
    return {g_in, g_w.t().reshape(dw_.sizes()).to(dw_.scalar_type()), g_b.to(dw_.scalar_type())};
  }

 private:
  ir::DepthwiseShape shape_;
  at::Tensor dw_, w_taps_, bias_;  // w_taps_: fp32 [KH * KW][Ch]; bias_: [Ch] fp32 (undefined without a bias)

  const float* b() const { return bias_.defined() ? bias_.data_ptr<float>() : nullptr; }
  ir::DepthwiseShape shape_of(const at::Tensor& e) const {  // this chunk's images
    ir::DepthwiseShape s = shape_;
    s.N = e.size(0);
    return s;
  }
};

// The Triton kernels (triton_kernels/inverted_residual_backward.py), through the ops that
// effops/ops/inverted_residual.py registers from Python: on CUDA tensors, or on CPU tensors in Triton's
// interpreter (tests). They read x and the expand weights (e and pre_e recomputed per tile, as the forward
// kernel does: the expanded tensor is never in memory), any memory format (the kernels read strides).
class TritonDepthwise final : public DepthwiseMiddle {
 public:
  using ForwardSig = at::Tensor(const at::Tensor&, const OptTensor&, const OptTensor&, const at::Tensor&,
                                const OptTensor&, at::IntArrayRef, at::IntArrayRef, std::optional<c10::string_view>);
  using BackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const at::Tensor&, const OptTensor&,
      at::IntArrayRef, at::IntArrayRef, std::optional<c10::string_view>);
  static constexpr const char* kForwardOp = "effops::inverted_residual_depthwise_triton";
  static constexpr const char* kBackwardOp = "effops::inverted_residual_depthwise_backward_triton";

  TritonDepthwise(const ir::Shape& s, const OptTensor& ew, const OptTensor& eb, const at::Tensor& dw,
                  const OptTensor& db, std::optional<c10::string_view> activation)
      : stride_{s.SH, s.SW}, padding_{s.PH, s.PW}, ew_(ew), eb_(eb), dw_(dw), db_(db), activation_(activation) {}

  bool reads_expanded() const override { return false; }

  at::Tensor forward(const at::Tensor& x, const at::Tensor&) const override {
    return effops::dispatch::python_route<ForwardSig>(kForwardOp)
        .call(x, ew_, eb_, dw_, db_, stride_, padding_, activation_);
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& g_d, const at::Tensor& x,
                                                          const at::Tensor&, const at::Tensor&) const override {
    return effops::dispatch::python_route<BackwardSig>(kBackwardOp)
        .call(g_d, x, ew_, eb_, dw_, db_, stride_, padding_, activation_);
  }

 private:
  std::array<int64_t, 2> stride_, padding_;
  OptTensor ew_, eb_;
  at::Tensor dw_;
  OptTensor db_;
  std::optional<c10::string_view> activation_;  // a view of backward_impl's argument, which outlives this
};

// Why the Triton depthwise middle cannot take this input, or nullptr. A batch of 0 runs (no chunk, no
// launch); grids are at most 65535 images per launch (backward_impl's chunks are capped to that).
const char* triton_declines(const ir::Shape& s, const at::Tensor& x) {
  auto& dispatcher = c10::Dispatcher::singleton();
  if (!dispatcher.findSchema({TritonDepthwise::kForwardOp, ""}).has_value() ||
      !dispatcher.findSchema({TritonDepthwise::kBackwardOp, ""}).has_value())
    return "triton is not installed";
  if (s.Cin == 0 || s.Ch == 0 || s.Cout == 0 || s.H == 0 || s.W == 0 || s.OH <= 0 || s.OW <= 0)
    return "empty tensor";
  int64_t span = 1;  // elements one image of x reaches (e is x without expansion)
  for (int d = 1; d < 4; ++d) span += (x.size(d) - 1) * x.stride(d);
  if (std::max({span, s.Ch * s.H * s.W, s.Ch * s.OH * s.OW}) >= (int64_t(1) << 31))
    return "an image spanning 2**31 elements or more (int32 offsets in the Triton kernels)";
  return nullptr;
}

// Gradients of images [n0, n1) into the accumulators (weights summed over chunks, grad_x sliced). With
// `middle`, the depthwise middle is ours (CPU kernel or Triton); otherwise every step is torch's.
void chunk_backward(const ir::Shape& s, const Se& se, const at::Tensor& gy, const at::Tensor& x, const OptTensor& ew,
                    const OptTensor& eb, const at::Tensor& dw, const OptTensor& db, const at::Tensor& pw,
                    const OptTensor& pb, const Needs& needs, const DepthwiseMiddle* middle,
                    std::vector<at::Tensor>& out) {
  const bool need_x = needs[0], need_e = needs[1] || needs[2], need_d = needs[3] || needs[4];
  const bool need_d_in = need_x || need_e || need_d;  // anything below the squeeze-excitation
  const bool need_se = se.on && (needs[7] || needs[8] || needs[9] || needs[10]);
  at::Tensor pre_e, e = x;
  if (s.expand && (middle == nullptr || middle->reads_expanded())) {
    pre_e = at::conv2d(x, *ew, eb);
    e = activate(pre_e, s.act);
  }
  at::Tensor pre_d, d;
  if (middle != nullptr) {
    d = middle->forward(x, e);
  } else {
    pre_d = at::conv2d(e, dw, db, {s.SH, s.SW}, {s.PH, s.PW}, {1, 1}, s.Ch);
    d = activate(pre_d, s.act);
  }
  at::Tensor pooled, ds = d;
  SeGate sg;
  if (se.on) {
    pooled = d.mean({2, 3}, /*keepdim=*/true);
    sg = se_gate(se, pooled);
    ds = d * sg.g;
  }
  const std::function<void(int, const at::Tensor&)> add = [&](int i, const at::Tensor& g) {
    if (g.defined()) out[i] = out[i].defined() ? out[i].add_(g) : g;
  };
  auto [g_ds, g_pw, g_pb] = at::convolution_backward(gy, ds, pw, std::vector<int64_t>{s.Cout}, {1, 1}, {0, 0}, {1, 1},
                                                     false, {0, 0}, 1, {need_d_in || need_se, needs[5], needs[6]});
  add(5, g_pw), add(6, g_pb);
  at::Tensor g_d = g_ds;
  if (se.on && (need_d_in || need_se)) g_d = se_backward(se, d, pooled, sg, g_ds, need_d_in, needs, add);
  at::Tensor g_x;
  if (need_d_in && middle != nullptr) {
    // g_in: the gradient at pre_e (at x without expansion), the expand activation's derivative applied
    auto [g_in, g_dw, g_db] = middle->backward(g_d, x, e, pre_e);
    if (needs[3]) add(3, g_dw);
    if (needs[4]) add(4, g_db);
    if (!s.expand) {
      g_x = g_in;
    } else if (need_x || need_e) {
      auto [gx, g_ew, g_eb] = at::convolution_backward(g_in, x, *ew, std::vector<int64_t>{s.Ch}, {1, 1}, {0, 0},
                                                       {1, 1}, false, {0, 0}, 1, {need_x, needs[1], needs[2]});
      add(1, g_ew), add(2, g_eb);
      g_x = gx;
    }
  } else if (need_d_in) {
    const at::Tensor g_pre_d = activation_backward(g_d, pre_d, s.act);
    auto [g_e, g_dw, g_db] = at::convolution_backward(
        g_pre_d, e, dw, std::vector<int64_t>{s.Ch}, {s.SH, s.SW}, {s.PH, s.PW}, {1, 1}, false, {0, 0}, s.Ch,
        {need_x || need_e, needs[3], needs[4]});
    add(3, g_dw), add(4, g_db);
    if (s.expand && (need_x || need_e)) {
      const at::Tensor g_pre_e = activation_backward(g_e, pre_e, s.act);
      auto [gx, g_ew, g_eb] = at::convolution_backward(g_pre_e, x, *ew, std::vector<int64_t>{s.Ch}, {1, 1}, {0, 0},
                                                       {1, 1}, false, {0, 0}, 1, {need_x, needs[1], needs[2]});
      add(1, g_ew), add(2, g_eb);
      g_x = gx;
    } else {
      g_x = g_e;
    }
  }
  if (need_x) {
    if (s.residual) g_x = g_x.defined() ? g_x + gy : gy.clone();
    out[0] = g_x;
  }
}

// Whether the fused CPU backward takes this block (see the file's comment).
bool fused_backward_takes(const ir::Shape& s) {
  return s.KH <= 8 && s.KW <= 8 && s.N >= at::get_num_threads();
}

Grads fused_backward_cpu(const ir::Shape& s, const Se& se, const at::Tensor& grad_y, const at::Tensor& x,
                         const OptTensor& ew, const OptTensor& eb, const at::Tensor& dw, const OptTensor& db,
                         const at::Tensor& pw, const OptTensor& pb, const Needs& needs) {
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor xc = x.contiguous(cl), gyc = grad_y.contiguous(cl);
  const auto opts = x.options().dtype(at::kFloat);
  // The forward's packed weights, and the two transposed products' panels (once per call, for both passes).
  const at::Tensor packed = pack(s, ew, eb, dw, db, pw, std::nullopt);
  at::Tensor project_t = at::empty({ir::padded(s.Ch) * s.Cout}, opts), expand_t;
  pack_panels(pw.reshape({s.Cout, s.Ch}).t(), project_t.mutable_data_ptr<float>());
  if (s.expand) {
    expand_t = at::empty({ir::padded(s.Cin) * s.Ch}, opts);
    pack_panels(ew->reshape({s.Ch, s.Cin}).t(), expand_t.mutable_data_ptr<float>());
  }
  at::Tensor g_x = at::empty_like(xc, cl);
  at::Tensor g_ew = s.expand ? at::empty({s.Ch, s.Cin}, opts) : at::Tensor();
  at::Tensor g_eb = s.expand ? at::empty({s.Ch}, opts) : at::Tensor();
  at::Tensor g_dw = at::empty({s.Ch, s.KH * s.KW}, opts), g_db = at::empty({s.Ch}, opts);
  at::Tensor g_pw = at::empty({s.Cout, s.Ch}, opts), g_pb = at::empty({s.Cout}, opts);
  const auto ptr = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; };
  const auto mut = [](at::Tensor& t) { return t.defined() ? t.mutable_data_ptr<float>() : nullptr; };
  const ir::BackwardWeights w{ptr(packed), ptr(expand_t), ptr(project_t)};
  const ir::WeightGrads g{mut(g_ew), mut(g_eb), mut(g_dw), mut(g_db), mut(g_pw), mut(g_pb)};
  // Squeeze-excitation: a first pass for d's means and the gradient at the gate; the gate and the SE's own
  // backward through torch's ops on those [N, Ch] tensors (fp32: the forward kernel's gate is fp32 too).
  std::vector<at::Tensor> se_grads(kInputs);
  at::Tensor gate, mean_grad;
  if (se.on) {
    const int64_t Chp = ir::padded(s.Ch);
    at::Tensor means = at::empty({s.N, Chp}, opts), gate_grad = at::empty({s.N, Chp}, opts);
    with_storage_type(x.scalar_type(), [&](auto type) {
      using T = decltype(type);
      ir::fused_backward_se_sums<T>(s, xc.const_data_ptr<T>(), gyc.const_data_ptr<T>(), w,
                                    means.mutable_data_ptr<float>(), gate_grad.mutable_data_ptr<float>());
    });
    const at::Tensor pooled = means.narrow(1, 0, s.Ch).reshape({s.N, s.Ch, 1, 1});
    const SeGate sg = se_gate(se, pooled);
    const at::Tensor g_pooled =
        se_gate_backward(se, pooled, sg, gate_grad.narrow(1, 0, s.Ch).reshape({s.N, s.Ch, 1, 1}), true, needs,
                         [&](int i, const at::Tensor& t) { se_grads[i] = t; });
    gate = at::zeros({s.N, Chp}, opts), mean_grad = at::zeros({s.N, Chp}, opts);
    gate.narrow(1, 0, s.Ch).copy_(sg.g.reshape({s.N, s.Ch}));
    mean_grad.narrow(1, 0, s.Ch).copy_(g_pooled.reshape({s.N, s.Ch}) / static_cast<double>(s.OH * s.OW));
  }
  const ir::SeTerms terms{gate.defined() ? gate.const_data_ptr<float>() : nullptr,
                          mean_grad.defined() ? mean_grad.const_data_ptr<float>() : nullptr};
  with_storage_type(x.scalar_type(), [&](auto type) {
    using T = decltype(type);
    ir::fused_backward<T>(s, xc.const_data_ptr<T>(), gyc.const_data_ptr<T>(), w, g_x.mutable_data_ptr<T>(), g,
                          se.on ? &terms : nullptr);
  });
  const auto like = [&](int i, const at::Tensor& grad, const OptTensor& weight) {
    return needs[i] && given(weight) && grad.defined() ? grad.reshape(weight->sizes()).to(weight->scalar_type())
                                                       : at::Tensor();
  };
  return {needs[0] ? g_x.contiguous(format_of(x)) : at::Tensor(),
          like(1, g_ew, ew),
          like(2, g_eb, eb),
          like(3, g_dw, dw),
          like(4, g_db, db),
          like(5, g_pw, pw),
          like(6, g_pb, pb),
          like(7, se_grads[7], se.reduce_w),
          like(8, se_grads[8], se.reduce_b),
          like(9, se_grads[9], se.expand_w),
          like(10, se_grads[10], se.expand_b)};
}

// Both devices' implementation: the route picks the depthwise middle (our CPU kernel, the Triton kernels, or
// torch's ops) and the chunk size; the expand and project convolutions' backward and the squeeze-excitation
// are torch's ops on every route.
template <c10::DeviceType kDevice>
Grads backward_impl(const at::Tensor& grad_y, const at::Tensor& x, const OptTensor& ew, const OptTensor& eb,
                   const at::Tensor& dw, const OptTensor& db, const at::Tensor& pw, const OptTensor& pb,
                   at::IntArrayRef stride, at::IntArrayRef padding, std::optional<c10::string_view> activation,
                   bool residual, const OptTensor& se_rw, const OptTensor& se_rb, const OptTensor& se_ew,
                   const OptTensor& se_eb, c10::string_view se_activation, c10::string_view se_gate_name,
                   Needs needs) {
  const ir::Shape s = checked_shape(x, ew, eb, dw, db, pw, pb, stride, padding, activation, residual);
  const Se se = checked_se(x, s, se_rw, se_rb, se_ew, se_eb, se_activation, se_gate_name);
  TORCH_CHECK_VALUE(grad_y.dim() == 4 && grad_y.size(0) == s.N && grad_y.size(1) == s.Cout &&
                        grad_y.size(2) == s.OH && grad_y.size(3) == s.OW && grad_y.scalar_type() == x.scalar_type(),
                    "grad_y must have the output's shape (", s.N, ", ", s.Cout, ", ", s.OH, ", ", s.OW, ") and dtype ",
                    x.scalar_type(), ", got ", grad_y.sizes(), " ", grad_y.scalar_type());
  using effops::dispatch::Backend;
  constexpr bool kCpu = kDevice == c10::DeviceType::CPU;
  constexpr const char* kOp = "inverted_residual_backward";
  // CPU: our kernel (the Triton kernels only when forced: the interpreter). CUDA: the Triton middle, torch's
  // ops where Triton declines (no speed rule: never measured against cuDNN).
  const char* triton_cannot = triton_declines(s, x);
  const Backend route = kCpu ? effops::dispatch::choose(kOp, kDevice, Backend::kCpu, nullptr, nullptr)
                             : effops::dispatch::choose(kOp, kDevice, Backend::kTriton, triton_cannot, nullptr);
  TORCH_CHECK_NOT_IMPLEMENTED(route == Backend::kCpu || route == Backend::kReference || route == Backend::kTriton,
                              "backend '", effops::dispatch::backend_name(route), "' is forced but has no kernel for ",
                              kOp);
  TORCH_CHECK_NOT_IMPLEMENTED(route != Backend::kTriton || triton_cannot == nullptr,
                              "backend 'triton' is forced but declines this ", kOp, " input: ", triton_cannot);
  if (route == Backend::kCpu && fused_backward_takes(s))
    return fused_backward_cpu(s, se, grad_y, x, ew, eb, dw, db, pw, pb, needs);
  // Forced "reference": torch's ops on the whole batch at once (the reference's arithmetic); otherwise chunks.
  const bool whole_batch = effops::dispatch::forced_backend() == Backend::kReference;
  const int64_t per_image = s.Ch * s.H * s.W * static_cast<int64_t>(x.element_size());
  const int64_t chunk_bytes = kCpu ? kCpuChunkBytes : kCudaChunkBytes;
  int64_t chunk = whole_batch ? std::max<int64_t>(1, s.N)
                              : std::max<int64_t>(1, chunk_bytes / std::max<int64_t>(1, per_image));
  if (route == Backend::kTriton) chunk = std::min<int64_t>(chunk, 65535);  // the kernels' CUDA grid z
  // Our depthwise middle: the CPU kernel for channels-last blocks (other layouts: torch's ops throughout),
  // the Triton kernels for any layout.
  std::unique_ptr<DepthwiseMiddle> middle;
  if (route == Backend::kCpu && format_of(x) == at::MemoryFormat::ChannelsLast && s.KH <= 8 && s.KW <= 8)
    middle = std::make_unique<DepthwiseKernel>(s, dw, db);
  else if (route == Backend::kTriton)
    middle = std::make_unique<TritonDepthwise>(s, ew, eb, dw, db, activation);
  std::vector<at::Tensor> out(kInputs);
  std::vector<at::Tensor> gx_parts;
  for (int64_t n0 = 0; n0 < s.N; n0 += chunk) {
    const int64_t n = std::min(chunk, s.N - n0);
    ir::Shape c = s;
    c.N = n;
    std::vector<at::Tensor> part(out);  // the weights' sums so far; part[0] is this chunk's grad_x
    part[0] = at::Tensor();
    chunk_backward(c, se, grad_y.narrow(0, n0, n), x.narrow(0, n0, n), ew, eb, dw, db, pw, pb, needs,
                   middle.get(), part);
    for (int i = 1; i < kInputs; ++i) out[i] = part[i];
    if (needs[0]) gx_parts.push_back(part[0]);
  }
  if (!gx_parts.empty()) out[0] = (gx_parts.size() == 1 ? gx_parts[0] : at::cat(gx_parts)).contiguous(format_of(x));
  const auto result = [&](int i, const OptTensor& like) {
    if (!needs[i] || !given(like)) return at::Tensor();
    return out[i].defined() ? out[i] : at::zeros_like(*like);  // batch 0: nothing summed
  };
  return {result(0, x), result(1, ew), result(2, eb), result(3, dw), result(4, db), result(5, pw), result(6, pb),
          result(7, se_rw), result(8, se_rb), result(9, se_ew), result(10, se_eb)};
}

// The forward op's C++ signature (the schema in inverted_residual.cpp).
using ForwardSig = at::Tensor(const at::Tensor&, const OptTensor&, const OptTensor&, const at::Tensor&,
                              const OptTensor&, const at::Tensor&, const OptTensor&, at::IntArrayRef, at::IntArrayRef,
                              std::optional<c10::string_view>, bool, const OptTensor&, const OptTensor&,
                              const OptTensor&, const OptTensor&, const OptTensor&, c10::string_view,
                              c10::string_view);

c10::TypedOperatorHandle<ForwardSig> forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("effops::inverted_residual", "").typed<ForwardSig>();
  return op;
}

OptTensor opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }
at::Tensor tensor(const OptTensor& o) { return given(o) ? *o : at::Tensor(); }
std::optional<c10::string_view> view(const std::optional<std::string>& s) {
  return s.has_value() ? std::optional<c10::string_view>(*s) : std::nullopt;
}

// The autograd of effops::inverted_residual: saves x and the weights, never an intermediate.
class InvertedResidualFunction : public torch::autograd::Function<InvertedResidualFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& ew, const OptTensor& eb,
                            const at::Tensor& dw, const OptTensor& db, const at::Tensor& pw, const OptTensor& pb,
                            std::vector<int64_t> stride, std::vector<int64_t> padding,
                            std::optional<std::string> activation, bool residual, const OptTensor& packed,
                            const OptTensor& se_rw, const OptTensor& se_rb, const OptTensor& se_ew,
                            const OptTensor& se_eb, std::string se_activation, std::string se_gate_name) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, tensor(ew), tensor(eb), dw, tensor(db), pw, tensor(pb), tensor(se_rw), tensor(se_rb),
                            tensor(se_ew), tensor(se_eb)});
    ctx->saved_data["forced_backend"] = static_cast<int64_t>(effops::dispatch::forced_on_this_thread());
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["activation"] = activation.has_value() ? c10::IValue(*activation) : c10::IValue();
    ctx->saved_data["residual"] = residual;
    ctx->saved_data["se_activation"] = se_activation;
    ctx->saved_data["se_gate"] = se_gate_name;
    ctx->saved_data["packed"] = given(packed);  // an input edge (without gradient) when given
    return forward_op().call(x, ew, eb, dw, db, pw, pb, stride, padding, view(activation), residual, packed, se_rw,
                             se_rb, se_ew, se_eb, se_activation, se_gate_name);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const effops::dispatch::ForwardBackendGuard forward_backend(ctx->saved_data["forced_backend"].toInt());
    const auto saved = ctx->get_saved_variables();
    const auto stride = ctx->saved_data["stride"].toIntVector(), padding = ctx->saved_data["padding"].toIntVector();
    const c10::IValue act = ctx->saved_data["activation"];
    const std::optional<std::string> activation =
        act.isNone() ? std::nullopt : std::optional<std::string>(act.toStringRef());
    // needs_input_grad counts only the inputs that were given (an absent optional is no input edge).
    Needs needs{};
    for (int i = 0, edge = 0; i < kInputs; ++i) {
      if (i == 7 && ctx->saved_data["packed"].toBool()) ++edge;  // packed's edge: before the SE weights
      if (saved[i].defined()) needs[i] = ctx->needs_input_grad(edge++);
    }
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("effops::inverted_residual_backward", "")
                               .typed<decltype(backward_impl<c10::DeviceType::CPU>)>();
    auto [gx, gew, geb, gdw, gdb, gpw, gpb, grw, grb, gsw, gsb] =
        op.call(grads[0].contiguous(format_of(saved[0])), saved[0], opt(saved[1]), opt(saved[2]), saved[3],
                opt(saved[4]), saved[5], opt(saved[6]), stride, padding, view(activation),
                ctx->saved_data["residual"].toBool(), opt(saved[7]), opt(saved[8]), opt(saved[9]), opt(saved[10]),
                ctx->saved_data["se_activation"].toStringRef(), ctx->saved_data["se_gate"].toStringRef(), needs);
    const at::Tensor none;
    return {gx, gew, geb, gdw, gdb, gpw, gpb, none, none, none, none, none, grw, grb, gsw, gsb, none, none};
  }
};

at::Tensor forward_autograd(const at::Tensor& x, const OptTensor& ew, const OptTensor& eb, const at::Tensor& dw,
                            const OptTensor& db, const at::Tensor& pw, const OptTensor& pb, at::IntArrayRef stride,
                            at::IntArrayRef padding, std::optional<c10::string_view> activation, bool residual,
                            const OptTensor& packed, const OptTensor& se_rw, const OptTensor& se_rb,
                            const OptTensor& se_ew, const OptTensor& se_eb, c10::string_view se_activation,
                            c10::string_view se_gate_name) {
  const auto grad = [&](const OptTensor& o) { return given(o) && o->requires_grad(); };
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || grad(ew) || grad(eb) || dw.requires_grad() || grad(db) ||
                                       pw.requires_grad() || grad(pb) || grad(se_rw) || grad(se_rb) || grad(se_ew) ||
                                       grad(se_eb))) {
    at::AutoDispatchBelowADInplaceOrView guard;  // inference: no graph to record
    return forward_op().call(x, ew, eb, dw, db, pw, pb, stride, padding, activation, residual, packed, se_rw, se_rb,
                             se_ew, se_eb, se_activation, se_gate_name);
  }
  if (x.device().is_cpu() && effops::dispatch::forced_backend() == effops::dispatch::Backend::kAuto) {
    const ir::Shape s = checked_shape(x, ew, eb, dw, db, pw, pb, stride, padding, activation, residual);
    const Se se = checked_se(x, s, se_rw, se_rb, se_ew, se_eb, se_activation, se_gate_name);
    // torch's ops, recorded by its autograd
    if (training_aten_faster(s, x.scalar_type(), fused_backward_takes(s), se.on) != nullptr) {
      effops::dispatch::record("inverted_residual", effops::dispatch::Backend::kReference);
      return aten_route(s, x, ew, eb, dw, db, pw, pb, se);
    }
  }
  const auto o = [](const OptTensor& t) { return given(t) ? t : std::nullopt; };
  return InvertedResidualFunction::apply(
      x, o(ew), o(eb), dw, o(db), pw, o(pb), stride.vec(), padding.vec(),
      activation.has_value() ? std::optional<std::string>(std::string(*activation)) : std::nullopt, residual,
      o(packed), o(se_rw), o(se_rb), o(se_ew), o(se_eb), std::string(se_activation), std::string(se_gate_name));
}

// Under autocast every floating input is cast to autocast's dtype, as torch's convolutions are. The
// packed weights (fp32, built from the weights' own dtype) go along only when the weights already have
// that dtype; otherwise the kernel packs the cast weights, so every route computes with the same ones.
template <c10::DeviceType kDevice>
at::Tensor forward_autocast(const at::Tensor& x, const OptTensor& ew, const OptTensor& eb, const at::Tensor& dw,
                            const OptTensor& db, const at::Tensor& pw, const OptTensor& pb, at::IntArrayRef stride,
                            at::IntArrayRef padding, std::optional<c10::string_view> activation, bool residual,
                            const OptTensor& packed, const OptTensor& se_rw, const OptTensor& se_rb,
                            const OptTensor& se_ew, const OptTensor& se_eb, c10::string_view se_activation,
                            c10::string_view se_gate_name) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  const auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(dtype, t, kDevice); };
  const auto cast_opt = [&](const OptTensor& t) { return given(t) ? OptTensor(cast(*t)) : std::nullopt; };
  const OptTensor keep_packed = dw.scalar_type() == dtype ? packed : std::nullopt;
  return forward_op().call(cast(x), cast_opt(ew), cast_opt(eb), cast(dw), cast_opt(db), cast(pw), cast_opt(pb),
                           stride, padding, activation, residual, keep_packed, cast_opt(se_rw), cast_opt(se_rb),
                           cast_opt(se_ew), cast_opt(se_eb), se_activation, se_gate_name);
}

Grads backward_meta(const at::Tensor& grad_y, const at::Tensor& x, const OptTensor& ew, const OptTensor& eb,
                    const at::Tensor& dw, const OptTensor& db, const at::Tensor& pw, const OptTensor& pb,
                    at::IntArrayRef stride, at::IntArrayRef padding, std::optional<c10::string_view> activation,
                    bool residual, const OptTensor& se_rw, const OptTensor& se_rb, const OptTensor& se_ew,
                    const OptTensor& se_eb, c10::string_view se_activation, c10::string_view se_gate_name,
                    Needs needs) {
  const ir::Shape s = checked_shape(x, ew, eb, dw, db, pw, pb, stride, padding, activation, residual);
  checked_se(x, s, se_rw, se_rb, se_ew, se_eb, se_activation, se_gate_name);
  const auto like = [&](int i, const OptTensor& t) { return needs[i] && given(t) ? at::empty_like(*t) : at::Tensor(); };
  return {like(0, x), like(1, ew), like(2, eb), like(3, dw), like(4, db), like(5, pw), like(6, pb),
          like(7, se_rw), like(8, se_rb), like(9, se_ew), like(10, se_eb)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(effops, m) {
  m.def("inverted_residual_backward(Tensor grad_y, Tensor x, Tensor? expand_weight, Tensor? expand_bias, "
        "Tensor dw_weight, Tensor? dw_bias, Tensor project_weight, Tensor? project_bias, int[2] stride, "
        "int[2] padding, str? activation, bool residual, Tensor? se_reduce_weight, Tensor? se_reduce_bias, "
        "Tensor? se_expand_weight, Tensor? se_expand_bias, str se_activation, str se_gate, bool[11] needs) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(effops, CPU, m) {
  m.impl("inverted_residual_backward", &backward_impl<c10::DeviceType::CPU>);
}
TORCH_LIBRARY_IMPL(effops, CUDA, m) {
  m.impl("inverted_residual_backward", &backward_impl<c10::DeviceType::CUDA>);
}
TORCH_LIBRARY_IMPL(effops, Meta, m) { m.impl("inverted_residual_backward", &backward_meta); }
TORCH_LIBRARY_IMPL(effops, Autograd, m) { m.impl("inverted_residual", &forward_autograd); }
TORCH_LIBRARY_IMPL(effops, AutocastCPU, m) { m.impl("inverted_residual", &forward_autocast<c10::DeviceType::CPU>); }
TORCH_LIBRARY_IMPL(effops, AutocastCUDA, m) {
  m.impl("inverted_residual", &forward_autocast<c10::DeviceType::CUDA>);
}
