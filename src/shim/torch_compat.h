// Force-included (by src/shim/cxx.sh) into torch-sys 0.26's generated op wrappers,
// torch_api_generated.cpp, which were generated from libtorch 2.13's op list.
//
// tch declares one `atg_*` C function per op and the extension must define them all, so
// against another torch each op that version lacks is supplied here, under the version that
// lacks it:
//   * ops torch later removed forward to their documented replacements (same results);
//   * ops that only arrived after an older torch raise the error torch raises for an op it
//     does not have. ferrotorch itself calls none of them.
// Adding a torch version: compile torch_api_generated.cpp against it; every "is not a
// member of torch" or "too many arguments" error is one entry below.
#pragma once

#include <torch/torch.h>
#include <torch/version.h>

#include <string>
#include <tuple>
#include <utility>

namespace ferrotorch_compat {
[[noreturn]] inline void unavailable(const char* op, const char* since) {
  TORCH_CHECK(false, "torch::", op, " needs torch >= ", since, "; ferrotorch was built against torch ",
              TORCH_VERSION);
}
using TensorPair = std::tuple<at::Tensor, at::Tensor>;
}  // namespace ferrotorch_compat

// An op that a torch version does not have: accepts the generated call's arguments, raises.
#define FERROTORCH_UNAVAILABLE(ret, op, since)                 \
  template <class... Args>                                      \
  ret op(Args&&...) {                                           \
    ::ferrotorch_compat::unavailable(#op, since);              \
  }

namespace torch {

#if TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR < 12
// Added in torch 2.12.
FERROTORCH_UNAVAILABLE(at::Tensor, _flash_attention_forward_no_dropout_inplace, "2.12")
FERROTORCH_UNAVAILABLE(at::Tensor, _philox_key_fold_in, "2.12")
FERROTORCH_UNAVAILABLE(at::Tensor, _philox_key_split, "2.12")
FERROTORCH_UNAVAILABLE(at::Tensor, _philox_normal, "2.12")
FERROTORCH_UNAVAILABLE(at::Tensor, _philox_normal_, "2.12")
FERROTORCH_UNAVAILABLE(at::Tensor, _philox_normal_out, "2.12")
FERROTORCH_UNAVAILABLE(at::Tensor, _philox_uniform, "2.12")
FERROTORCH_UNAVAILABLE(at::Tensor, _philox_uniform_, "2.12")
FERROTORCH_UNAVAILABLE(at::Tensor, _philox_uniform_out, "2.12")
FERROTORCH_UNAVAILABLE(at::Tensor, _upsample_lanczos2d_aa, "2.12")
FERROTORCH_UNAVAILABLE(at::Tensor, _upsample_lanczos2d_aa_backward, "2.12")
FERROTORCH_UNAVAILABLE(at::Tensor, _upsample_lanczos2d_aa_backward_out, "2.12")
FERROTORCH_UNAVAILABLE(at::Tensor, _upsample_lanczos2d_aa_out, "2.12")
// 2.12 added `enable_gqa` (an MPS-only op); declaring the name here hides at::'s overload.
FERROTORCH_UNAVAILABLE(::ferrotorch_compat::TensorPair, _scaled_dot_product_attention_math_for_mps, "2.12")
#endif

#if TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 14
// Removed in torch 2.14 after their deprecation; torch.cholesky / torch.qr documented these
// replacements.
inline at::Tensor cholesky(const at::Tensor& self, bool upper) {
  return at::linalg_cholesky(self, upper);
}
inline at::Tensor& cholesky_out(at::Tensor& out, const at::Tensor& self, bool upper) {
  return at::linalg_cholesky_out(out, self, upper);
}
inline std::tuple<at::Tensor, at::Tensor> qr(const at::Tensor& self, bool some) {
  return at::linalg_qr(self, some ? "reduced" : "complete");
}
inline std::tuple<at::Tensor&, at::Tensor&> qr_out(at::Tensor& Q, at::Tensor& R, const at::Tensor& self,
                                                   bool some) {
  return at::linalg_qr_out(Q, R, self, some ? "reduced" : "complete");
}
#endif

}  // namespace torch

#undef FERROTORCH_UNAVAILABLE
