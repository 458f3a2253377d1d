// Torch bindings of sampler.c's kernels: torch.library ops in the namespace qvpo_native, built and
// loaded by torch.utils.cpp_extension.load (qvpo/native/__init__.py). Each op takes tensors, reads
// their sizes and seed strides, and calls the C kernel on their data with torch's intra-op thread
// count. The checked, documented entry points are the Python functions of qvpo.native (their
// checks give the error messages callers see); the checks here keep a direct torch.ops caller
// from handing the kernels memory of the wrong device, type or layout.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "sampler.h"

namespace {

using at::Tensor;

int threads() { return at::get_num_threads(); }

bool is_bf16(const Tensor& t) { return t.scalar_type() == at::kBFloat16; }

// t: a CPU float32 tensor (or bfloat16 where bf16_ok) of `dim` dimensions, contiguous if asked;
// otherwise its last dimension must be dense (the kernels read rows with unit stride).
void check(const Tensor& t, const char* op, const char* name, int64_t dim, bool contiguous,
           bool bf16_ok = false) {
  TORCH_CHECK(t.device().is_cpu(), "qvpo_native::", op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || (bf16_ok && is_bf16(t)), "qvpo_native::", op, ": ",
              name, " must be float32", bf16_ok ? " or bfloat16" : "", ", got ", t.scalar_type());
  TORCH_CHECK(dim < 0 || t.dim() == dim, "qvpo_native::", op, ": ", name, " must have ", dim,
              " dimensions, got ", t.sizes());
  TORCH_CHECK(contiguous ? t.is_contiguous() : (t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1),
              "qvpo_native::", op, ": ", name, contiguous ? " must be contiguous" : " needs dense rows");
}

Tensor mish(const Tensor& x) {
  check(x, "mish", "x", -1, true);
  Tensor out = at::empty_like(x);
  qvpo_mish(x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), x.numel(), threads());
  return out;
}

void mish_out(const Tensor& x, const Tensor& out) {
  check(x, "mish_out", "x", -1, true);
  check(out, "mish_out", "out", -1, true);
  TORCH_CHECK(out.numel() == x.numel(), "qvpo_native::mish_out: out must have x's size");
  qvpo_mish(x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), x.numel(), threads());
}

Tensor mish_backward(const Tensor& x, const Tensor& grad) {
  check(x, "mish_backward", "x", -1, true);
  check(grad, "mish_backward", "grad", -1, true);
  TORCH_CHECK(grad.numel() == x.numel(), "qvpo_native::mish_backward: grad must have x's size");
  Tensor out = at::empty_like(x);
  qvpo_mish_backward(x.const_data_ptr<float>(), grad.const_data_ptr<float>(), out.mutable_data_ptr<float>(),
                     x.numel(), threads());
  return out;
}

void first_layer_mish(const Tensor& x, const Tensor& W_a, const Tensor& state_part, const Tensor& step_part,
                      const Tensor& out) {
  const char* op = "first_layer_mish";
  check(x, op, "x", 3, true);
  check(W_a, op, "W_a", 3, false);
  check(state_part, op, "state_part", 3, false);
  check(step_part, op, "step_part", 2, false);
  check(out, op, "out", 3, true, true);
  const int64_t N = x.size(0), R = x.size(1), A = x.size(2), H = W_a.size(2), S = state_part.size(1);
  TORCH_CHECK(S >= 1 && R % S == 0 && out.size(0) == N && out.size(1) == R && out.size(2) == H,
              "qvpo_native::first_layer_mish: bad shapes");
  qvpo_first_layer_mish(x.const_data_ptr<float>(), W_a.const_data_ptr<float>(), state_part.const_data_ptr<float>(),
                        step_part.const_data_ptr<float>(), out.data_ptr(), N, R, A, H, R / S, W_a.stride(0),
                        state_part.stride(0), step_part.stride(0), is_bf16(out), threads());
}

void bias_mish(const Tensor& x, const Tensor& bias, const Tensor& out) {
  check(x, "bias_mish", "x", 3, true, true);
  check(out, "bias_mish", "out", 3, true, true);
  check(bias, "bias_mish", "bias", -1, false);
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() &&
                  bias.numel() == x.size(0) * x.size(2),
              "qvpo_native::bias_mish: bad shapes");
  qvpo_bias_mish(x.const_data_ptr(), bias.const_data_ptr<float>(), out.data_ptr(), x.size(0), x.size(1),
                 x.size(2), bias.stride(0), is_bf16(x), threads());
}

void bias_mish_out(const Tensor& x, const Tensor& bias, const Tensor& W_out_t, const Tensor& b_out,
                   const Tensor& out) {
  const char* op = "bias_mish_out";
  check(x, op, "x", 3, true, true);
  check(bias, op, "bias", -1, false);
  check(W_out_t, op, "W_out_t", 3, false);
  check(b_out, op, "b_out", -1, false);
  check(out, op, "out", 3, true);
  const int64_t N = x.size(0), R = x.size(1), H = x.size(2), A = W_out_t.size(1);
  TORCH_CHECK(A <= 32 && W_out_t.size(2) == H && bias.numel() == N * H && b_out.numel() == N * A &&
                  out.size(0) == N && out.size(1) == R && out.size(2) == A,
              "qvpo_native::bias_mish_out: bad shapes");
  qvpo_bias_mish_out(x.const_data_ptr(), bias.const_data_ptr<float>(), W_out_t.const_data_ptr<float>(),
                     b_out.const_data_ptr<float>(), out.mutable_data_ptr<float>(), N, R, H, A, bias.stride(0),
                     W_out_t.stride(0), b_out.stride(0), is_bf16(x), threads());
}

bool fused_available(bool bf16) { return qvpo_fused_available(bf16) != 0; }

void fused_rc(int rc, const char* what) {
  TORCH_CHECK(rc == 0, "qvpo.native: the fused ", what, " failed (code ", rc, ": ",
              rc == -1 ? "not available here" : "out of memory", ")");
}

// Wp: the packed hidden weights, (N, L, ...) contiguous, float32 or (bf16) bfloat16; bias (N, L, H).
void check_network(const char* op, const Tensor& Wp, const Tensor& bias, const Tensor& W_out_t, const Tensor& b_out,
                   bool bf16) {
  TORCH_CHECK(Wp.device().is_cpu() && Wp.is_contiguous() && Wp.scalar_type() == (bf16 ? at::kBFloat16 : at::kFloat),
              "qvpo_native::", op, ": Wp must be contiguous CPU ", bf16 ? "bfloat16" : "float32");
  check(bias, op, "bias", 3, true);
  check(W_out_t, op, "W_out_t", 3, true);
  check(b_out, op, "b_out", 2, true);
}

Tensor sample_fused(const Tensor& noise, const Tensor& state_part, const Tensor& step_part, const Tensor& W_a,
                    const Tensor& Wp, const Tensor& bias, const Tensor& W_out_t, const Tensor& b_out,
                    const Tensor& coefs, bool clip_x0, bool bf16) {
  const char* op = "sample_fused";
  check(noise, op, "noise", 4, true);
  check(state_part, op, "state_part", 3, false);
  check(step_part, op, "step_part", 3, true);
  check(W_a, op, "W_a", 3, false);
  check(coefs, op, "coefs", 2, true);
  check_network(op, Wp, bias, W_out_t, b_out, bf16);
  const int64_t N = noise.size(0), T = noise.size(1), R = noise.size(2), A = noise.size(3);
  const int64_t H = W_a.size(2), L = bias.size(1), S = state_part.size(1);
  TORCH_CHECK(S >= 1 && R % S == 0 && Wp.numel() == N * L * H * H && step_part.numel() == N * T * H &&
                  coefs.numel() == T * 5 && W_out_t.numel() == N * A * H,
              "qvpo_native::sample_fused: bad shapes");
  Tensor out = at::empty({N, R, A}, noise.options());
  fused_rc(qvpo_sample_fused(noise.const_data_ptr<float>(), state_part.const_data_ptr<float>(),
                             step_part.const_data_ptr<float>(), W_a.const_data_ptr<float>(), Wp.const_data_ptr(),
                             bias.const_data_ptr<float>(), W_out_t.const_data_ptr<float>(),
                             b_out.const_data_ptr<float>(), coefs.const_data_ptr<float>(),
                             out.mutable_data_ptr<float>(), N, T, R, A, H, L, R / S, state_part.stride(0),
                             W_a.stride(0), clip_x0, bf16, threads()),
           "sampler");
  return out;
}

Tensor mlp_fused(const Tensor& x, const Tensor& state_part, const Tensor& b1, const Tensor& W_a, const Tensor& Wp,
                 const Tensor& bias, const Tensor& W_out_t, const Tensor& b_out, bool bf16) {
  const char* op = "mlp_fused";
  check(x, op, "x", 3, true);
  check(state_part, op, "state_part", 3, false);
  check(b1, op, "b1", -1, false);
  check(W_a, op, "W_a", 3, false);
  check_network(op, Wp, bias, W_out_t, b_out, bf16);
  const int64_t N = x.size(0), R = x.size(1), A = x.size(2);
  const int64_t H = W_a.size(2), L = bias.size(1), O = W_out_t.size(1), S = state_part.size(1);
  TORCH_CHECK(S >= 1 && R % S == 0 && Wp.numel() == N * L * H * H && b1.numel() == N * H,
              "qvpo_native::mlp_fused: bad shapes");
  Tensor out = at::empty({N, R, O}, x.options());
  fused_rc(qvpo_mlp_fused(x.const_data_ptr<float>(), state_part.const_data_ptr<float>(), b1.const_data_ptr<float>(),
                          W_a.const_data_ptr<float>(), Wp.const_data_ptr(), bias.const_data_ptr<float>(),
                          W_out_t.const_data_ptr<float>(), b_out.const_data_ptr<float>(),
                          out.mutable_data_ptr<float>(), N, R, A, H, L, O, R / S, state_part.stride(0),
                          b1.stride(0), W_a.stride(0), bf16, threads()),
           "MLP");
  return out;
}

}  // namespace

TORCH_LIBRARY(qvpo_native, m) {
  m.def("mish(Tensor x) -> Tensor");  // differentiable: its autograd formula is registered in Python
  m.def("mish_out(Tensor x, Tensor(a!) out) -> ()");
  m.def("mish_backward(Tensor x, Tensor grad) -> Tensor");
  m.def("first_layer_mish(Tensor x, Tensor W_a, Tensor state_part, Tensor step_part, Tensor(a!) out) -> ()");
  m.def("bias_mish(Tensor x, Tensor bias, Tensor(a!) out) -> ()");
  m.def("bias_mish_out(Tensor x, Tensor bias, Tensor W_out_t, Tensor b_out, Tensor(a!) out) -> ()");
  m.def("sample_fused(Tensor noise, Tensor state_part, Tensor step_part, Tensor W_a, Tensor Wp, Tensor bias, "
        "Tensor W_out_t, Tensor b_out, Tensor coefs, bool clip_x0, bool bf16) -> Tensor");
  m.def("mlp_fused(Tensor x, Tensor state_part, Tensor b1, Tensor W_a, Tensor Wp, Tensor bias, Tensor W_out_t, "
        "Tensor b_out, bool bf16) -> Tensor");
  m.def("fused_available(bool bf16) -> bool", &fused_available);  // no tensors: one kernel for every key
}

TORCH_LIBRARY_IMPL(qvpo_native, CPU, m) {
  m.impl("mish", &mish);
  m.impl("mish_out", &mish_out);
  m.impl("mish_backward", &mish_backward);
  m.impl("first_layer_mish", &first_layer_mish);
  m.impl("bias_mish", &bias_mish);
  m.impl("bias_mish_out", &bias_mish_out);
  m.impl("sample_fused", &sample_fused);
  m.impl("mlp_fused", &mlp_fused);
}
