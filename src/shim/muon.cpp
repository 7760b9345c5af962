// Muon's step for one parameter, op for op torch's `_single_tensor_muon` and
// `_zeropower_via_newtonschulz` (torch/optim/_muon.py), run through ATen's C++ API: the
// same kernels in the same order give torch's numbers bit for bit, without the Python
// dispatch of ~20 ops per parameter. Compiled by build.rs; called from src/optim/muon.rs
// with the GIL released. The tensors are tch handles (`at::Tensor*`) the caller owns.

#include <ATen/ATen.h>
#include <ATen/ScalarOps.h>
#include <ATen/core/grad_mode.h>

#include <cstdio>
#include <exception>

extern "C" {

struct FtMuon {
  double one_minus_momentum;  // Python's `1 - momentum`
  double momentum;
  int32_t nesterov;
  int32_t copy_bf16;          // torch >= 2.15: `grad.to(dtype=torch.bfloat16, copy=True)`
  double a, b, c;             // ns_coefficients
  int64_t ns_steps;
  double eps;
  double decay;               // Python's `1 - lr * weight_decay`
  double alpha;               // Python's `-adjusted_lr`
};

// 0 on success; 1 with `err` filled when ATen raised (the caller has already checked
// everything torch's Python code checks, so this is an ATen error such as out of memory).
int ft_muon_update(void* param_h, void* grad_h, void* buf_h, const FtMuon* h, char* err, size_t errlen) {
  try {
    at::NoGradGuard no_grad;
    at::Tensor& param = *static_cast<at::Tensor*>(param_h);
    const at::Tensor& grad = *static_cast<at::Tensor*>(grad_h);
    at::Tensor& buf = *static_cast<at::Tensor*>(buf_h);

    buf.lerp_(grad, h->one_minus_momentum);
    at::Tensor update = h->nesterov ? grad.lerp(buf, h->momentum) : buf;

    // _zeropower_via_newtonschulz. Before torch 2.15, `.bfloat16()` returns the tensor
    // itself when it is already bf16, so (as in torch) a bf16 buffer without Nesterov is
    // divided in place; 2.15 copies.
    at::Tensor ortho = update.to(at::kBFloat16, false, h->copy_bf16 != 0);
    const bool tall = update.size(0) > update.size(1);
    if (tall) ortho = ortho.t();
    // Tensor.norm() on a strided CPU tensor is linalg.vector_norm(x, 2); clamp(min=eps).
    ortho.div_(at::clamp(at::linalg_vector_norm(ortho, 2), h->eps, c10::nullopt));
    for (int64_t i = 0; i < h->ns_steps; ++i) {
      at::Tensor gram = at::matmul(ortho, ortho.t());
      at::Tensor gram_update = at::addmm(gram, gram, gram, h->b, h->c);
      ortho = at::addmm(ortho, gram_update, ortho, h->a);
    }
    if (tall) ortho = ortho.t();

    // Python's `param.mul_(float)` binds mul_.Tensor with the float as a wrapped-number
    // tensor; mul_.Scalar rounds the factor to bf16/fp16 first and differs there.
    param.mul_(at::native::wrapped_scalar_tensor(h->decay));
    param.add_(ortho, h->alpha);
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, errlen, "%s", e.what());
    return 1;
  }
}

}  // extern "C"
