// What the optimizer step needs to know about a Python tensor object, read in one call
// without creating a tensor handle (no allocation, no reference-count traffic), and the
// version-counter bump torch's in-place ops do. Compiled by build.rs against the torch
// that builds ferrotorch; called from src/access.rs.

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <cstdint>

extern "C" {

struct FtMeta {
  uint64_t data;     // first element's address (0 when there is none)
  uint64_t numel;
  uint64_t span;     // bytes from `data` to the end of the last element (strided)
  int64_t sizes[8];
  int32_t dim;
  int32_t dtype;     // c10::ScalarType
  uint32_t flags;    // FT_* below
  int32_t status;    // ft_tensor_metas: what ft_tensor_meta would return
};
static_assert(sizeof(FtMeta) == 104, "src/access.rs's Meta has the same fields");

enum : uint32_t {
  FT_CPU_DENSE = 1u,    // a strided CPU tensor with storage, no Python/functorch/functional wrapper
  FT_CONTIGUOUS = 2u,
  FT_NEG = 4u,
  FT_CONJ = 8u,
  FT_INFERENCE = 16u,
  FT_SPARSE = 32u,
};

// 0: `obj` is a defined torch.Tensor and `out` describes it; 1: not a torch.Tensor (or an
// undefined one); 2: a tensor whose layout cannot be read here (wrapper subclass, functorch
// or functional tensor, more than 8 dims, no storage): torch must handle it.
static int read_meta(const at::Tensor& t, FtMeta* out);

int ft_tensor_meta(PyObject* obj, FtMeta* out) {
  try {
    if (!THPVariable_Check(obj)) return 1;
    out->status = read_meta(THPVariable_Unpack(obj), out);
    return out->status;
  } catch (...) {
    return 2;
  }
}

// ft_tensor_meta for `n` objects whose type the caller has checked to be exactly
// torch.Tensor or nn.Parameter (THPVariable_Check is a Python call, this is not): it only
// reads C++ objects, so torch's worker threads can run it while the caller holds the GIL.
// The next objects' tensor structs are prefetched: after an optimizer's kernel has swept
// the caches, each read would otherwise wait for memory in turn.
void ft_tensor_metas(PyObject* const* objs, size_t n, FtMeta* out) {
  // Three stages ahead of the read: the object, its TensorImpl, its StorageImpl.
  constexpr size_t kObj = 24, kImpl = 16, kStorage = 8;
  auto impl_of = [&](size_t i) { return THPVariable_Unpack(objs[i]).unsafeGetTensorImpl(); };
  for (size_t i = 0; i < n; ++i) {
    if (i + kObj < n) __builtin_prefetch(objs[i + kObj]);
    if (i + kImpl < n) {
      const char* p = reinterpret_cast<const char*>(impl_of(i + kImpl));
      __builtin_prefetch(p);
      __builtin_prefetch(p + 64);
      __builtin_prefetch(p + 128);
    }
    if (i + kStorage < n) {
      __builtin_prefetch(impl_of(i + kStorage)->unsafe_storage().unsafeGetStorageImpl());
    }
    try {
      out[i].status = read_meta(THPVariable_Unpack(objs[i]), &out[i]);
    } catch (...) {
      out[i].status = 2;
    }
  }
}

static int read_meta(const at::Tensor& t, FtMeta* out) {
  // Field by field: `*out = FtMeta{}` compiles to `rep stos`, slow to start for 104 bytes.
  out->data = 0;
  out->numel = 0;
  out->span = 0;
  out->dim = 0;
  out->dtype = -1;
  out->flags = 0;
  if (!t.defined()) return 1;
  c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  out->dtype = static_cast<int32_t>(impl->dtype().toScalarType());
  const c10::DispatchKeySet ks = impl->key_set();
  if (ks.has(c10::DispatchKey::Python) || ks.has(c10::DispatchKey::Functionalize) ||
      ks.has_any(c10::functorch_transforms_ks) || impl->is_nested()) {
    return 2;
  }
  if (impl->is_sparse()) {
    out->flags |= FT_SPARSE;
    return 0;
  }
  if (impl->layout() != c10::kStrided || impl->is_mkldnn() || !impl->has_storage()) return 2;
  const int64_t dim = impl->dim();
  if (dim > 8) return 2;
  out->dim = static_cast<int32_t>(dim);
  const auto sizes = impl->sizes();
  const auto strides = impl->strides();
  int64_t last = 0;
  for (int64_t i = 0; i < dim; ++i) {
    out->sizes[i] = sizes[i];
    if (sizes[i] > 0 && strides[i] > 0) last += (sizes[i] - 1) * strides[i];
  }
  out->numel = impl->numel();
  out->span = out->numel > 0 ? static_cast<uint64_t>(last + 1) * impl->itemsize() : 0;
  if (impl->is_contiguous()) out->flags |= FT_CONTIGUOUS;
  if (impl->is_neg()) out->flags |= FT_NEG;
  if (impl->is_conj()) out->flags |= FT_CONJ;
  if (impl->is_inference()) out->flags |= FT_INFERENCE;
  if (impl->device_type() == c10::DeviceType::CPU) {
    out->flags |= FT_CPU_DENSE;
    if (out->numel > 0) {
      // mutable_data(): the first element, after materializing a copy-on-write storage.
      void* data = impl->mutable_data();
      if (data == nullptr) return 2;
      out->data = reinterpret_cast<uint64_t>(data);
    }
  }
  return 0;
}

// `t._version += 1` for one tensor, as torch's in-place ops do; false for an undefined or
// inference tensor (which has no version).
static bool bump_one(const at::Tensor& t) {
  if (!t.defined() || t.is_inference()) return false;
  t.unsafeGetTensorImpl()->bump_version();
  return true;
}

// `t._version += 1` for each tensor object, as torch's in-place ops do. Returns the number
// of objects that are not tensors (or are inference tensors, which have no version).
int ft_bump_versions(PyObject* const* objs, size_t n) {
  int skipped = 0;
  for (size_t i = 0; i < n; ++i) {
    try {
      if (!THPVariable_Check(objs[i]) || !bump_one(THPVariable_Unpack(objs[i]))) ++skipped;
    } catch (...) {
      ++skipped;
    }
  }
  return skipped;
}

// ft_bump_versions for objects whose type the caller has checked to be exactly torch.Tensor
// or nn.Parameter (a null entry is skipped): no Python call, so it runs without the GIL.
void ft_bump_plain(PyObject* const* objs, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (objs[i] == nullptr) continue;
    try {
      bump_one(THPVariable_Unpack(objs[i]));
    } catch (...) {
    }
  }
}

// `obj.grad` for an object whose type is exactly torch.Tensor or nn.Parameter (the caller
// checks; a subclass may override the property), as torch's getter returns it without
// its attribute lookup: a new reference (Py_None when there is no grad), or NULL with a
// Python error set.
// Like the getter, it turns torch's warnings (a non-leaf's grad) into Python warnings.
PyObject* ft_grad(PyObject* obj) {
  HANDLE_TH_ERRORS
  if (!THPVariable_Check(obj)) {
    PyErr_SetString(PyExc_TypeError, "ft_grad: not a tensor");
    return nullptr;
  }
  return THPVariable_Wrap(THPVariable_Unpack(obj).grad());
  END_HANDLE_TH_ERRORS
}

// ft_grad for `n` objects of exactly torch.Tensor or nn.Parameter type (the caller checks),
// into `out` (new references; Py_None for no grad). Each parameter's grad sits at the end of
// a chain (object, TensorImpl, AutogradMeta, the grad's TensorImpl), so the chains of the
// next parameters are prefetched link by link: after an optimizer's kernel has swept the
// caches, following one chain at a time would wait for memory at every link. Torch's
// warnings (a non-leaf's grad) become Python warnings, in order, at the end. 0 done; -1 a
// Python error is set (entries already written are still the caller's references).
int ft_grads(PyObject* const* objs, size_t n, PyObject** out) {
  HANDLE_TH_ERRORS
  constexpr size_t kObj = 12, kImpl = 8, kMeta = 4, kGrad = 2;
  auto impl_of = [&](size_t i) { return THPVariable_Unpack(objs[i]).unsafeGetTensorImpl(); };
  auto meta_of = [&](size_t i) {
    return static_cast<torch::autograd::AutogradMeta*>(impl_of(i)->autograd_meta());
  };
  for (size_t i = 0; i < n; ++i) {
    if (i + kObj < n) __builtin_prefetch(objs[i + kObj]);
    if (i + kImpl < n) __builtin_prefetch(impl_of(i + kImpl));
    if (i + kMeta < n) {
      if (auto* m = meta_of(i + kMeta)) {
        __builtin_prefetch(m);
        __builtin_prefetch(reinterpret_cast<const char*>(m) + 64);
      }
    }
    if (i + kGrad < n) {
      if (auto* m = meta_of(i + kGrad)) __builtin_prefetch(m->grad_.unsafeGetTensorImpl());
    }
    out[i] = THPVariable_Wrap(THPVariable_Unpack(objs[i]).grad());
    if (out[i] == nullptr) return -1;
  }
  return 0;
  END_HANDLE_TH_ERRORS_RET(-1)
}

// `*out = dict.get(key)` (a borrowed reference, NULL when absent) with `hash` as the key's
// hash, so that a key whose hash is a Python function (torch.Tensor.__hash__) is not called
// again: 0 done, -1 a Python error is set, 1 this Python has no such lookup (3.13 made it
// internal) and the caller looks up as usual.
int ft_dict_get_known_hash(PyObject* dict, PyObject* key, Py_hash_t hash, PyObject** out) {
#if PY_VERSION_HEX < 0x030D0000
  *out = _PyDict_GetItem_KnownHash(dict, key, hash);
  return (*out == nullptr && PyErr_Occurred()) ? -1 : 0;
#else
  (void)dict;
  (void)key;
  (void)hash;
  *out = nullptr;
  return 1;
#endif
}

}  // extern "C"
