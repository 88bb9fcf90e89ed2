// effops::inverted_residual_backward and the autograd of effops::inverted_residual.
//
// The forward saves only x and the weights: the expanded tensor (6x the block's channels) and the
// depthwise output are recomputed in the backward, a chunk of images at a time, and never exist for
// the whole batch. Per chunk, through ATen (torch's convolution and activation backward kernels):
//   e = act(expand(x)), d = act(depthwise(e)), then convolution_backward of project, depthwise, expand
//   in turn, with the activations' derivatives between them (aten's *_backward formulas).
// Routes: "cpu" (ours) recomputes per chunk of about kChunkBytes of expanded tensor; "reference" (the
// plain ATen route) does the same arithmetic on the whole batch at once. A fused backward kernel (the
// expanded tile recomputed in cache, as the forward does) is not written yet.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <vector>

#include "bindings/dispatch.h"
#include "bindings/inverted_residual.h"

namespace {

using namespace effops::bindings::inverted_residual;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kChunkBytes = 8ll << 20;  // expanded tensor per chunk: L3-sized, below glibc's mmap threshold

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

// Gradients of images [n0, n1) into the accumulators (weights summed over chunks, grad_x sliced).
void chunk_backward(const ir::Shape& s, const at::Tensor& gy, const at::Tensor& x, const OptTensor& ew,
                    const OptTensor& eb, const at::Tensor& dw, const OptTensor& db, const at::Tensor& pw,
                    const OptTensor& pb, const std::array<bool, 7>& needs, std::vector<at::Tensor>& out) {
  const bool need_x = needs[0], need_e = needs[1] || needs[2], need_d = needs[3] || needs[4];
  const bool need_d_in = need_x || need_e || need_d;  // anything below the project conv
  at::Tensor pre_e, e = x;
  if (s.expand) {
    pre_e = at::conv2d(x, *ew, eb);
    e = activate(pre_e, s.act);
  }
  const at::Tensor pre_d = at::conv2d(e, dw, db, {s.SH, s.SW}, {s.PH, s.PW}, {1, 1}, s.Ch);
  const at::Tensor d = activate(pre_d, s.act);
  const auto add = [&](int i, const at::Tensor& g) {
    if (g.defined()) out[i] = out[i].defined() ? out[i].add_(g) : g;
  };
  auto [g_d, g_pw, g_pb] = at::convolution_backward(gy, d, pw, std::vector<int64_t>{s.Cout}, {1, 1}, {0, 0}, {1, 1},
                                                    false, {0, 0}, 1, {need_d_in, needs[5], needs[6]});
  add(5, g_pw), add(6, g_pb);
  at::Tensor g_x;
  if (need_d_in) {
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const OptTensor& ew, const OptTensor& eb, const at::Tensor& dw,
    const OptTensor& db, const at::Tensor& pw, const OptTensor& pb, at::IntArrayRef stride, at::IntArrayRef padding,
    std::optional<c10::string_view> activation, bool residual, std::array<bool, 7> needs) {
  const ir::Shape s = checked_shape(x, ew, eb, dw, db, pw, pb, stride, padding, activation, residual);
  TORCH_CHECK_VALUE(grad_y.dim() == 4 && grad_y.size(0) == s.N && grad_y.size(1) == s.Cout &&
                        grad_y.size(2) == s.OH && grad_y.size(3) == s.OW && grad_y.scalar_type() == x.scalar_type(),
                    "grad_y must have the output's shape (", s.N, ", ", s.Cout, ", ", s.OH, ", ", s.OW, ") and dtype ",
                    x.scalar_type(), ", got ", grad_y.sizes(), " ", grad_y.scalar_type());
  using effops::dispatch::Backend;
  const Backend route = effops::dispatch::choose("inverted_residual_backward", c10::DeviceType::CPU, Backend::kCpu,
                                                 nullptr, nullptr);
  TORCH_CHECK_NOT_IMPLEMENTED(route == Backend::kCpu || route == Backend::kReference, "backend '",
                              effops::dispatch::backend_name(route),
                              "' is forced but has no kernel for inverted_residual_backward on CPU tensors");
  const int64_t per_image = s.Ch * s.H * s.W * static_cast<int64_t>(x.element_size());
  const int64_t chunk = route == Backend::kCpu ? std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, per_image))
                                               : std::max<int64_t>(1, s.N);
  std::vector<at::Tensor> out(7);
  std::vector<at::Tensor> gx_parts;
  for (int64_t n0 = 0; n0 < s.N; n0 += chunk) {
    const int64_t n = std::min(chunk, s.N - n0);
    ir::Shape c = s;
    c.N = n;
    std::vector<at::Tensor> part(7);
    part[1] = out[1], part[2] = out[2], part[3] = out[3], part[4] = out[4], part[5] = out[5], part[6] = out[6];
    chunk_backward(c, grad_y.narrow(0, n0, n), x.narrow(0, n0, n), ew, eb, dw, db, pw, pb, needs, part);
    for (int i = 1; i < 7; ++i) out[i] = part[i];
    if (needs[0]) gx_parts.push_back(part[0]);
  }
  if (needs[0]) out[0] = (gx_parts.size() == 1 ? gx_parts[0] : at::cat(gx_parts)).contiguous(format_of(x));
  const auto result = [&](int i, const at::Tensor& like) {
    if (!needs[i]) return at::Tensor();
    return out[i].defined() ? out[i] : at::zeros_like(like);  // batch 0: nothing summed
  };
  return {result(0, x), result(1, ew.value_or(at::Tensor())), result(2, eb.value_or(at::Tensor())), result(3, dw),
          result(4, db.value_or(at::Tensor())), result(5, pw), result(6, pb.value_or(at::Tensor()))};
}

// The autograd of effops::inverted_residual: saves x and the weights, never an intermediate.
class InvertedResidualFunction : public torch::autograd::Function<InvertedResidualFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& ew, const OptTensor& eb,
                            const at::Tensor& dw, const OptTensor& db, const at::Tensor& pw, const OptTensor& pb,
                            std::vector<int64_t> stride, std::vector<int64_t> padding,
                            std::optional<std::string> activation, bool residual, const OptTensor& packed) {
    at::AutoDispatchBelowADInplaceOrView guard;
    const auto t = [](const OptTensor& o) { return given(o) ? *o : at::Tensor(); };
    ctx->save_for_backward({x, t(ew), t(eb), dw, t(db), pw, t(pb)});
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["activation"] = activation.has_value() ? c10::IValue(*activation) : c10::IValue();
    ctx->saved_data["residual"] = residual;
    return forward_op().call(x, ew, eb, dw, db, pw, pb, stride, padding,
                             activation.has_value() ? std::optional<c10::string_view>(*activation) : std::nullopt,
                             residual, packed);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto stride = ctx->saved_data["stride"].toIntVector(), padding = ctx->saved_data["padding"].toIntVector();
    const c10::IValue act = ctx->saved_data["activation"];
    const std::optional<std::string> activation =
        act.isNone() ? std::nullopt : std::optional<std::string>(act.toStringRef());
    // needs_input_grad counts only the inputs that were given (an absent optional is no input edge).
    std::vector<bool> needs(7);
    for (int i = 0, edge = 0; i < 7; ++i) needs[i] = saved[i].defined() && ctx->needs_input_grad(edge++);
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("effops::inverted_residual_backward", "")
                               .typed<decltype(backward_cpu)>();
    const std::array<bool, 7> flags{needs[0], needs[1], needs[2], needs[3], needs[4], needs[5], needs[6]};
    auto [gx, gew, geb, gdw, gdb, gpw, gpb] =
        op.call(grads[0].contiguous(format_of(saved[0])), saved[0], opt(saved[1]), opt(saved[2]), saved[3],
                opt(saved[4]), saved[5], opt(saved[6]), stride, padding,
                activation.has_value() ? std::optional<c10::string_view>(*activation) : std::nullopt,
                ctx->saved_data["residual"].toBool(), flags);
    return {gx, gew, geb, gdw, gdb, gpw, gpb, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }

 private:
  static OptTensor opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }
  static c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const OptTensor&, const OptTensor&, const at::Tensor&,
                                             const OptTensor&, const at::Tensor&, const OptTensor&, at::IntArrayRef,
                                             at::IntArrayRef, std::optional<c10::string_view>, bool,
                                             const OptTensor&)>
  forward_op() {
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("effops::inverted_residual", "")
                               .typed<at::Tensor(const at::Tensor&, const OptTensor&, const OptTensor&,
                                                 const at::Tensor&, const OptTensor&, const at::Tensor&,
                                                 const OptTensor&, at::IntArrayRef, at::IntArrayRef,
                                                 std::optional<c10::string_view>, bool, const OptTensor&)>();
    return op;
  }
};

at::Tensor forward_autograd(const at::Tensor& x, const OptTensor& ew, const OptTensor& eb, const at::Tensor& dw,
                            const OptTensor& db, const at::Tensor& pw, const OptTensor& pb, at::IntArrayRef stride,
                            at::IntArrayRef padding, std::optional<c10::string_view> activation, bool residual,
                            const OptTensor& packed) {
  const auto grad = [&](const OptTensor& o) { return given(o) && o->requires_grad(); };
  if (!at::GradMode::is_enabled() || !(x.requires_grad() || grad(ew) || grad(eb) || dw.requires_grad() || grad(db) ||
                                       pw.requires_grad() || grad(pb))) {
    at::AutoDispatchBelowADInplaceOrView guard;  // inference: no graph to record
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("effops::inverted_residual", "")
                               .typed<decltype(forward_autograd)>();
    return op.call(x, ew, eb, dw, db, pw, pb, stride, padding, activation, residual, packed);
  }
  const auto o = [](const OptTensor& t) { return given(t) ? t : std::nullopt; };
  return InvertedResidualFunction::apply(
      x, o(ew), o(eb), dw, o(db), pw, o(pb), stride.vec(), padding.vec(),
      activation.has_value() ? std::optional<std::string>(std::string(*activation)) : std::nullopt, residual,
      o(packed));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_meta(
    const at::Tensor& grad_y, const at::Tensor& x, const OptTensor& ew, const OptTensor& eb, const at::Tensor& dw,
    const OptTensor& db, const at::Tensor& pw, const OptTensor& pb, at::IntArrayRef stride, at::IntArrayRef padding,
    std::optional<c10::string_view> activation, bool residual, std::array<bool, 7> needs) {
  checked_shape(x, ew, eb, dw, db, pw, pb, stride, padding, activation, residual);
  const auto like = [&](int i, const OptTensor& t) { return needs[i] && given(t) ? at::empty_like(*t) : at::Tensor(); };
  return {needs[0] ? at::empty_like(x) : at::Tensor(), like(1, ew), like(2, eb), like(3, dw), like(4, db),
          like(5, pw), like(6, pb)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(effops, m) {
  m.def("inverted_residual_backward(Tensor grad_y, Tensor x, Tensor? expand_weight, Tensor? expand_bias, "
        "Tensor dw_weight, Tensor? dw_bias, Tensor project_weight, Tensor? project_bias, int[2] stride, "
        "int[2] padding, str? activation, bool residual, bool[7] needs) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(effops, CPU, m) { m.impl("inverted_residual_backward", &backward_cpu); }
TORCH_LIBRARY_IMPL(effops, Meta, m) { m.impl("inverted_residual_backward", &backward_meta); }
TORCH_LIBRARY_IMPL(effops, Autograd, m) { m.impl("inverted_residual", &forward_autograd); }
