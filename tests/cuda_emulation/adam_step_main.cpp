// Runs csrc/cuda/adam_step.cu's effops::cuda::launch_adam_step under the host emulation, one case per
// directory argument. params.txt: dtype master amsgrad maximize decoupled has_weight_decay unscale,
// the fp32 bit patterns of lerp_weight beta2 one_minus_beta2 eps weight_decay decay_factor
// grad_scale, the tensor count, then per tensor: numel and the bit patterns of neg_step_size and
// bias_correction2_sqrt. Per tensor i, t<i>_{param,grad,exp_avg,exp_avg_sq[,max_exp_avg_sq][,master]}.bin
// are read and written back as .out files; status.txt lists the launches.
#include EFFOPS_EMU_KERNEL_SOURCE

#include "harness_io.h"

namespace {

using effops::cuda::AdamDtype;
using effops::cuda::AdamHyperArgs;
using effops::cuda::AdamTensorArgs;

float bits_to_float(long long bits) {
  const uint32_t u = static_cast<uint32_t>(bits);
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void run_case(const std::string& dir) {
  const std::vector<long long> v = harness::read_params(dir);
  if (v.size() < 15) harness::die("params.txt of " + dir + ": too short");
  const AdamDtype dtype = static_cast<AdamDtype>(v[0]);
  const bool master = v[1] != 0, amsgrad = v[2] != 0;
  AdamHyperArgs h{bits_to_float(v[7]), bits_to_float(v[8]), bits_to_float(v[9]), bits_to_float(v[10]),
                  bits_to_float(v[11]), bits_to_float(v[12]), bits_to_float(v[13]),
                  amsgrad, v[3] != 0, v[4] != 0, v[5] != 0, v[6] != 0};
  const long long count = v[14];
  if (static_cast<long long>(v.size()) != 15 + 3 * count) harness::die("params.txt of " + dir + ": bad tensor list");
  const size_t p_elem = dtype == AdamDtype::kFloat32 ? 4 : 2, s_elem = master || dtype == AdamDtype::kFloat32 ? 4 : 2;

  struct Bufs {
    harness::Buffer param, grad, exp_avg, exp_avg_sq, max_sq, master;
  };
  std::vector<Bufs> bufs(count);
  std::vector<AdamTensorArgs> args(count);
  for (long long i = 0; i < count; ++i) {
    const long long n = v[15 + 3 * i];
    const std::string t = dir + "/t" + std::to_string(i) + "_";
    Bufs& b = bufs[i];
    b.param = harness::read_buffer(t + "param.bin", n * p_elem);
    b.grad = harness::read_buffer(t + "grad.bin", n * p_elem);
    b.exp_avg = harness::read_buffer(t + "exp_avg.bin", n * s_elem);
    b.exp_avg_sq = harness::read_buffer(t + "exp_avg_sq.bin", n * s_elem);
    if (amsgrad) b.max_sq = harness::read_buffer(t + "max_exp_avg_sq.bin", n * s_elem);
    if (master) b.master = harness::read_buffer(t + "master.bin", n * 4);
    args[i] = AdamTensorArgs{b.param.ptr, b.grad.ptr, b.exp_avg.ptr, b.exp_avg_sq.ptr, amsgrad ? b.max_sq.ptr : nullptr,
                             master ? reinterpret_cast<float*>(b.master.ptr) : nullptr, n,
                             bits_to_float(v[15 + 3 * i + 1]), bits_to_float(v[15 + 3 * i + 2])};
  }
  effops_emu::g_launches.clear();
  cudaError_t err = effops::cuda::launch_adam_step(args.data(), count, dtype, master, h, nullptr);
  if (err == cudaSuccess) err = cudaGetLastError();
  for (long long i = 0; i < count; ++i) {
    const std::string t = dir + "/t" + std::to_string(i) + "_";
    const Bufs& b = bufs[i];
    harness::write_bytes(t + "param.out", b.param.ptr, b.param.bytes);
    harness::write_bytes(t + "grad.out", b.grad.ptr, b.grad.bytes);
    harness::write_bytes(t + "exp_avg.out", b.exp_avg.ptr, b.exp_avg.bytes);
    harness::write_bytes(t + "exp_avg_sq.out", b.exp_avg_sq.ptr, b.exp_avg_sq.bytes);
    if (amsgrad) harness::write_bytes(t + "max_exp_avg_sq.out", b.max_sq.ptr, b.max_sq.bytes);
    if (master) harness::write_bytes(t + "master.out", b.master.ptr, b.master.bytes);
  }
  harness::write_status(dir, static_cast<int>(err));
}

}  // namespace

int main(int argc, char** argv) {
  const int first = harness::parse_options(argc, argv);
  for (int i = first; i < argc; ++i) run_case(argv[i]);
  return 0;
}
