//! The gate between Python-owned tensors and raw pointers.
//!
//! A tensor reaches a kernel only if it is a plain `torch.Tensor`/`nn.Parameter` object (no
//! subclass: DTensor, FakeTensor, FunctionalTensor and `__torch_function__` types report data
//! pointers that are not theirs, or none) and, read at the moment of the call, a dense,
//! contiguous CPU buffer with real storage. Nothing is remembered between calls: every call
//! re-reads the objects and their metadata, and the memory all buffers of one call cover is
//! checked for overlap as a whole before any of them is written.

pub use ferrotorch_kernels::overlap::{any_overlap, any_overlap_sorted};
use ferrotorch_kernels::DType;
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyDict, PyType};
use tch::{Device, Kind, Tensor};

use crate::errors::Error;

static PLAIN_TYPES: GILOnceCell<(Py<PyType>, Py<PyType>)> = GILOnceCell::new();

fn plain_types(py: Python<'_>) -> PyResult<&(Py<PyType>, Py<PyType>)> {
    PLAIN_TYPES.get_or_try_init(py, || {
        let torch = py.import("torch")?;
        let tensor = torch.getattr("Tensor")?.downcast_into::<PyType>()?.unbind();
        let param = torch
            .getattr("nn")?
            .getattr("Parameter")?
            .downcast_into::<PyType>()?
            .unbind();
        Ok((tensor, param))
    })
}

/// Whether `obj`'s type is exactly `torch.Tensor` or `torch.nn.Parameter`.
pub fn is_plain(obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    let (tensor, param) = plain_types(obj.py())?;
    // Type pointers compared without taking references: this runs for every tensor a step
    // reads.
    let ty = obj.get_type_ptr() as *mut pyo3::ffi::PyObject;
    Ok(ty == tensor.as_ptr() || ty == param.as_ptr())
}

/// An object whose type was exactly `torch.Tensor` or `nn.Parameter` when it was made. (A
/// later `__class__` assignment can only pick a layout-compatible tensor type, so the
/// object stays a tensor struct; the shim still refuses wrapper subclasses by their
/// dispatch keys.)
pub struct Plain<'py>(Bound<'py, PyAny>);

impl<'py> Plain<'py> {
    pub fn new(obj: Bound<'py, PyAny>) -> PyResult<Option<Plain<'py>>> {
        Ok(is_plain(&obj)?.then_some(Plain(obj)))
    }

    /// The object's address, a number that may cross into GIL-free code (see
    /// [`Meta::read_plain`], [`bump_plain_versions`]).
    pub fn addr(&self) -> usize {
        self.0.as_ptr() as usize
    }
}

/// Whether `obj` is any `torch.Tensor`, subclasses included.
pub fn is_tensor(obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    let (tensor, _) = plain_types(obj.py())?;
    obj.is_instance(tensor.bind(obj.py()))
}

static DTENSOR: GILOnceCell<Option<Py<PyType>>> = GILOnceCell::new();

/// A DTensor (FSDP2, tensor parallel) split into what an elementwise step needs: its local
/// shard (a plain tensor object) and its layout (device mesh, placements).
pub struct Sharded<'py> {
    pub local: Bound<'py, PyAny>,
    mesh: Bound<'py, PyAny>,
    placements: Bound<'py, PyAny>,
}

impl<'py> Sharded<'py> {
    /// `obj` as a DTensor (exactly that type), or None.
    pub fn of(obj: &Bound<'py, PyAny>) -> PyResult<Option<Sharded<'py>>> {
        let py = obj.py();
        let ty = DTENSOR.get_or_init(py, || {
            let m = py.import("torch.distributed.tensor").ok()?;
            Some(
                m.getattr("DTensor")
                    .ok()?
                    .downcast_into::<PyType>()
                    .ok()?
                    .unbind(),
            )
        });
        let Some(ty) = ty else { return Ok(None) };
        // Compared without taking a reference to the type: this runs for every parameter.
        if obj.get_type_ptr() as *mut pyo3::ffi::PyObject != ty.as_ptr() {
            return Ok(None);
        }
        Ok(Some(Sharded {
            local: obj.getattr(pyo3::intern!(py, "_local_tensor"))?,
            mesh: obj.getattr(pyo3::intern!(py, "device_mesh"))?,
            placements: obj.getattr(pyo3::intern!(py, "placements"))?,
        }))
    }

    /// Same mesh and placements: elementwise math on the local shards is the global math.
    pub fn same_layout(&self, other: &Sharded<'py>) -> PyResult<bool> {
        Ok(self.mesh.is(&other.mesh) && self.placements.eq(&other.placements)?)
    }
}

const FT_CPU_DENSE: u32 = 1;
const FT_CONTIGUOUS: u32 = 2;
const FT_NEG: u32 = 4;
const FT_CONJ: u32 = 8;
const FT_INFERENCE: u32 = 16;
const FT_SPARSE: u32 = 32;

extern "C" {
    // src/shim/tensor_meta.cpp
    fn ft_tensor_meta(obj: *mut pyo3::ffi::PyObject, out: *mut Meta) -> std::ffi::c_int;
    fn ft_tensor_metas(objs: *const *mut pyo3::ffi::PyObject, n: usize, out: *mut Meta);
    fn ft_bump_plain(objs: *const *mut pyo3::ffi::PyObject, n: usize);
    fn ft_bump_versions(objs: *const *mut pyo3::ffi::PyObject, n: usize) -> std::ffi::c_int;
    fn ft_grad(obj: *mut pyo3::ffi::PyObject) -> *mut pyo3::ffi::PyObject;
    fn ft_grads(
        objs: *const *mut pyo3::ffi::PyObject,
        n: usize,
        out: *mut *mut pyo3::ffi::PyObject,
    ) -> std::ffi::c_int;
    fn ft_dict_get_known_hash(
        dict: *mut pyo3::ffi::PyObject,
        key: *mut pyo3::ffi::PyObject,
        hash: pyo3::ffi::Py_hash_t,
        out: *mut *mut pyo3::ffi::PyObject,
    ) -> std::ffi::c_int;
}

/// `p.grad`, read straight from the tensor when `p` is a plain tensor (whose `grad` is
/// torch's C getter: the same object comes back, without the attribute lookup); otherwise
/// through `getattr`, so that a subclass's property runs.
pub fn grad_of<'py>(p: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let py = p.py();
    if !is_plain(p)? {
        return p.getattr(pyo3::intern!(py, "grad"));
    }
    // SAFETY: `p` is a live torch.Tensor (checked above); the shim returns a new reference
    // or NULL with an error set.
    unsafe { Bound::from_owned_ptr_or_err(py, ft_grad(p.as_ptr())) }
}

/// `p.grad` for every `p` of `params`, in order: [`grad_of`] for each, with runs of plain
/// tensors read in one shim call that prefetches the next parameters' objects.
pub fn grads_of<'py>(params: &[Bound<'py, PyAny>]) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let mut out = Vec::with_capacity(params.len());
    let mut k = 0;
    while k < params.len() {
        let run = params[k..]
            .iter()
            .map(is_plain)
            .take_while(|r| matches!(r, Ok(true)))
            .count();
        if run == 0 {
            out.push(grad_of(&params[k])?);
            k += 1;
            continue;
        }
        let objs: Vec<*mut pyo3::ffi::PyObject> =
            params[k..k + run].iter().map(|p| p.as_ptr()).collect();
        let mut got = vec![std::ptr::null_mut(); run];
        // SAFETY: every object is a live torch.Tensor/nn.Parameter (checked above; held by
        // `params`); the shim writes new references (or leaves NULL) into `got`.
        let rc = unsafe { ft_grads(objs.as_ptr(), run, got.as_mut_ptr()) };
        let py = params[0].py();
        for g in got.into_iter().filter(|g| !g.is_null()) {
            // SAFETY: a new reference from the shim, owned from here on.
            out.push(unsafe { Bound::from_owned_ptr(py, g) });
        }
        if rc != 0 {
            return Err(PyErr::fetch(py));
        }
        k += run;
    }
    Ok(out)
}

/// `optimizer.state[p]` lookups within one call. `torch.Tensor.__hash__` is a Python
/// function returning `id(self)`, and calling it costs more than the rest of a parameter's
/// lookups. So the first plain tensor (and the first parameter) of each call is hashed the
/// ordinary way; when that hash is its address, later keys of exactly that type are looked
/// up with their address as the hash, which is what the call would return. Any other key,
/// a changed `__hash__`, or a Python without the known-hash lookup takes the ordinary path.
#[derive(Default)]
pub struct StateLookup {
    /// Per plain type (Tensor, Parameter): not yet checked at this call, or the verdict.
    hash_is_id: [Option<bool>; 2],
}

impl StateLookup {
    /// `dict.get(key)` (no `__missing__`), None when absent.
    pub fn get<'py>(
        &mut self,
        dict: &Bound<'py, PyDict>,
        key: &Bound<'py, PyAny>,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        let py = key.py();
        let (tensor, param) = plain_types(py)?;
        let ty = key.get_type_ptr() as *mut pyo3::ffi::PyObject;
        let slot = if ty == tensor.as_ptr() {
            0
        } else if ty == param.as_ptr() {
            1
        } else {
            return dict.get_item(key);
        };
        let addr = key.as_ptr() as pyo3::ffi::Py_hash_t;
        let trusted = match self.hash_is_id[slot] {
            Some(ok) => ok,
            None => {
                let ok = key.hash()? == addr;
                self.hash_is_id[slot] = Some(ok);
                ok
            }
        };
        if !trusted {
            return dict.get_item(key);
        }
        let mut out = std::ptr::null_mut();
        // SAFETY: both objects are alive (borrowed, GIL held); the shim returns a borrowed
        // reference into `dict`, taken over as a new one below before anything can run.
        match unsafe { ft_dict_get_known_hash(dict.as_ptr(), key.as_ptr(), addr, &mut out) } {
            0 if out.is_null() => Ok(None),
            // SAFETY: a valid borrowed reference (see above).
            0 => Ok(Some(unsafe { Bound::from_borrowed_ptr(py, out) })),
            1 => dict.get_item(key),
            _ => Err(PyErr::fetch(py)),
        }
    }
}

/// A tensor as one step call sees it: its layout read from the object at that moment, in
/// one call and without a tensor handle. Plain data (the address is a number), so it can
/// cross into GIL-free code; the caller keeps the Python object alive meanwhile.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Meta {
    data: usize,
    numel: usize,
    /// Bytes from `data` to the end of the last element.
    span: usize,
    sizes: [i64; 8],
    dim: i32,
    /// c10::ScalarType.
    dtype: i32,
    flags: u32,
    /// The shim's verdict: 0 read, 1 not a tensor, 2 a tensor torch must handle.
    status: i32,
}

// Filled by src/shim/tensor_meta.cpp's FtMeta: same fields, same layout.
const _: () = assert!(std::mem::size_of::<Meta>() == 104);

impl Meta {
    /// An unused slot.
    pub const NONE: Meta = Meta {
        data: 0,
        numel: 0,
        span: 0,
        sizes: [0; 8],
        dim: 0,
        dtype: -1,
        flags: 0,
        status: 1,
    };

    /// `obj` read now, if it is a plain `torch.Tensor`/`nn.Parameter` (exactly) whose
    /// layout the kernels can judge; None sends it to torch.
    pub fn of(obj: &Bound<'_, PyAny>) -> PyResult<Option<Meta>> {
        if !is_plain(obj)? {
            return Ok(None);
        }
        let mut m = Meta::NONE;
        // SAFETY: `obj` is a live object (we hold it, with the GIL); the shim only reads it
        // and writes `m`.
        let rc = unsafe { ft_tensor_meta(obj.as_ptr(), &mut m) };
        Ok((rc == 0).then_some(m))
    }

    /// [`Meta::of`] for the objects at `addrs`, into `out` (one layout each); an object
    /// the shim cannot judge gets a layout that is not [`Meta::ok`]. These are C++ reads
    /// only, so torch's worker threads may make them while the caller holds the GIL (which
    /// keeps any Python code from changing a tensor meanwhile).
    ///
    /// # Safety
    /// Every address is a live object made a [`Plain`] at this call and held by the caller
    /// until this returns; `out` is as long as `addrs`.
    pub unsafe fn read_plain(addrs: &[usize], out: &mut [Meta]) {
        debug_assert_eq!(addrs.len(), out.len());
        // SAFETY: forwarded from the caller.
        unsafe {
            ft_tensor_metas(
                addrs.as_ptr() as *const *mut pyo3::ffi::PyObject,
                addrs.len(),
                out.as_mut_ptr(),
            )
        }
    }

    /// Whether the shim read this tensor's layout (see [`Meta::of`]).
    pub fn ok(&self) -> bool {
        self.status == 0
    }

    pub fn is_sparse(&self) -> bool {
        self.flags & FT_SPARSE != 0
    }

    pub fn sizes(&self) -> &[i64] {
        &self.sizes[..self.dim.clamp(0, 8) as usize]
    }

    pub fn same_shape(&self, other: &Meta) -> bool {
        self.sizes() == other.sizes()
    }

    pub fn same_dtype(&self, other: &Meta) -> bool {
        self.dtype == other.dtype
    }

    pub fn dtype_name(&self) -> &'static str {
        match self.dtype {
            5 => "Half",
            6 => "Float",
            7 => "Double",
            15 => "BFloat16",
            8..=10 => "Complex",
            _ => "a non-float dtype",
        }
    }

    /// Element type the kernels handle, or None (the inverse of [`scalar_type`]).
    pub fn kernel_dtype(&self) -> Option<DType> {
        match self.dtype {
            6 => Some(DType::F32),
            7 => Some(DType::F64),
            15 => Some(DType::BF16),
            5 => Some(DType::F16),
            _ => None,
        }
    }

    /// Real CPU memory whose bytes are exactly the values, and writable in place here.
    pub fn plain_cpu(&self) -> bool {
        self.flags & FT_CPU_DENSE != 0 && self.flags & (FT_NEG | FT_CONJ | FT_INFERENCE) == 0
    }

    /// The tensor as a flat buffer of a kernel dtype: plain CPU memory, contiguous.
    pub fn flat(&self) -> Option<Flat> {
        if !self.plain_cpu() || self.flags & FT_CONTIGUOUS == 0 {
            return None;
        }
        let dtype = self.kernel_dtype()?;
        if self.data == 0 && self.numel > 0 {
            return None;
        }
        Some(Flat {
            dtype,
            numel: self.numel,
            ptr: self.data as *mut u8,
        })
    }

    /// The tensor as a flat, read-only int64 buffer (a sparse tensor's indices): plain CPU
    /// memory, contiguous; `(address, numel)`.
    pub fn flat_i64(&self) -> Option<(usize, usize)> {
        const LONG: i32 = 4;
        if !self.plain_cpu() || self.flags & FT_CONTIGUOUS == 0 || self.dtype != LONG {
            return None;
        }
        if self.data == 0 && self.numel > 0 {
            return None;
        }
        Some((self.data, self.numel))
    }

    /// The bytes a strided CPU tensor may touch, or None (empty, not CPU memory).
    pub fn extent(&self) -> Option<(usize, usize)> {
        if self.flags & FT_CPU_DENSE == 0 || self.numel == 0 || self.data == 0 {
            return None;
        }
        Some((self.data, self.data + self.span))
    }

    /// A one-element f32/f64 state tensor in plain CPU memory.
    ///
    /// # Safety
    /// The tensor must outlive every use of the result, and nothing else in use may
    /// overlap its element.
    pub unsafe fn scalar(&self) -> Option<Scalar> {
        if !self.plain_cpu() || self.numel != 1 || self.data == 0 {
            return None;
        }
        let double = match self.dtype {
            6 => false,
            7 => true,
            _ => return None,
        };
        Some(Scalar {
            ptr: self.data as *mut u8,
            double,
        })
    }
}

/// `t._version += 1`, as torch's in-place ops do, for the objects at `addrs` (0: none),
/// spread over up to `threads` of torch's threads when there are many: no Python call is
/// made (the counter is atomic), so this runs without the GIL.
///
/// # Safety
/// Every non-zero address is a live object made a [`Plain`] at this call and held by the
/// caller until this returns.
pub unsafe fn bump_plain_versions(addrs: &[usize], threads: usize) {
    const BLOCK: usize = 512;
    let bump = |a: &[usize]| {
        // SAFETY: forwarded from the caller.
        unsafe { ft_bump_plain(a.as_ptr() as *const *mut pyo3::ffi::PyObject, a.len()) }
    };
    if threads < 2 || addrs.len() < 2 * BLOCK {
        return bump(addrs);
    }
    crate::parallel::for_each(addrs.chunks(BLOCK).collect(), threads, &bump);
}

/// `t._version += 1` for every tensor object in `objs`, as torch's in-place ops do.
pub fn bump_versions<'a, 'py: 'a>(objs: impl IntoIterator<Item = &'a Bound<'py, PyAny>>) {
    let ptrs: Vec<*mut pyo3::ffi::PyObject> = objs.into_iter().map(|o| o.as_ptr()).collect();
    // SAFETY: every object is alive (borrowed, GIL held); the shim skips non-tensors.
    unsafe { ft_bump_versions(ptrs.as_ptr(), ptrs.len()) };
}

/// The libtorch handle of a plain tensor object; None for anything else (subclasses, None,
/// non-tensors). The handle shares the object's TensorImpl, so metadata read through it
/// later in the same call is the object's own.
pub fn plain_tensor(obj: &Bound<'_, PyAny>) -> PyResult<Option<Tensor>> {
    if !is_plain(obj)? {
        return Ok(None);
    }
    let ptr = obj.as_ptr() as *mut tch::python::CPyObject;
    // SAFETY: `obj` is a live torch.Tensor (checked above); unpack only reads it.
    let t = unsafe { Tensor::pyobject_unpack(ptr) }.map_err(|e| Error::Runtime(e.to_string()))?;
    Ok(t)
}

/// Element type the kernels handle, or None.
pub fn kernel_dtype(t: &Tensor) -> Option<DType> {
    kind_dtype(t.f_kind().ok()?)
}

/// The kernels' element type for a tch `Kind`, or None.
pub fn kind_dtype(kind: Kind) -> Option<DType> {
    match kind {
        Kind::Float => Some(DType::F32),
        Kind::Double => Some(DType::F64),
        Kind::BFloat16 => Some(DType::BF16),
        Kind::Half => Some(DType::F16),
        _ => None,
    }
}

/// c10's ScalarType number of a kernel element type (what [`Meta::kernel_dtype`] reads).
pub fn scalar_type(d: DType) -> i32 {
    match d {
        DType::F16 => 5,
        DType::F32 => 6,
        DType::F64 => 7,
        DType::BF16 => 15,
    }
}

/// A dense buffer a kernel may read and write: `numel` elements of `dtype` at `ptr`.
#[derive(Clone, Copy, Debug)]
pub struct Flat {
    pub dtype: DType,
    pub numel: usize,
    pub ptr: *mut u8,
}

impl Flat {
    /// The half-open byte range the buffer covers (empty for 0 elements).
    pub fn range(&self) -> (usize, usize) {
        let start = self.ptr as usize;
        (start, start + self.numel * self.dtype.size())
    }
}

/// A strided CPU tensor with real storage and no lazy negation whose bytes are exactly its
/// values, and which torch lets ops modify in place here. Sparse, mkldnn, meta, device and
/// inference tensors fail (torch refuses in-place updates to the latter outside
/// inference mode; its own function then raises that error).
fn cpu_strided(t: &Tensor) -> bool {
    t.defined()
        && !t.is_sparse()
        && !t.is_mkldnn()
        && t.device() == Device::Cpu
        && !t.is_neg()
        && !t.is_inference()
}

/// `t` as a flat buffer of the kernels' dtypes: plain strided CPU, contiguous, with a data
/// pointer for every non-empty tensor. Read fresh at every call.
pub fn flat(t: &Tensor) -> Option<Flat> {
    if !cpu_strided(t) || !t.is_contiguous() {
        return None;
    }
    let dtype = kernel_dtype(t)?;
    let numel = Shape::of(t)?.numel();
    let ptr = t.data_ptr() as *mut u8;
    if ptr.is_null() && numel > 0 {
        return None;
    }
    Some(Flat { dtype, numel, ptr })
}

/// A tensor's sizes, read without allocating (tensors of more than 8 dims compare unequal
/// to everything, which only sends them to torch).
#[derive(PartialEq, Eq, Clone, Copy)]
pub struct Shape {
    dim: usize,
    sizes: [i64; 8],
}

impl Shape {
    pub fn numel(&self) -> usize {
        self.sizes[..self.dim]
            .iter()
            .map(|&n| n.max(0) as usize)
            .product()
    }

    pub fn of(t: &Tensor) -> Option<Shape> {
        let dim = t.dim();
        if dim > 8 {
            return None;
        }
        let mut sizes = [0i64; 8];
        // SAFETY: `t` is a defined tensor handle and `sizes` has room for its `dim` sizes.
        unsafe { torch_sys::at_shape(t.as_ptr() as *mut _, sizes.as_mut_ptr()) };
        Some(Shape { dim, sizes })
    }
}

/// A scalar state tensor (`step`, `mu_product`, `eta`…) the step reads and writes: one f32
/// or f64 element on the CPU, updated in its own dtype as torch's ops on it would.
#[derive(Clone, Copy)]
pub struct Scalar {
    ptr: *mut u8,
    double: bool,
}

impl Scalar {
    /// An unused slot (never read or written).
    pub const NONE: Scalar = Scalar {
        ptr: std::ptr::null_mut(),
        double: false,
    };

    pub fn range(&self) -> (usize, usize) {
        let s = self.ptr as usize;
        (s, s + if self.double { 8 } else { 4 })
    }

    pub fn get(&self) -> f64 {
        // SAFETY: `of`'s contract keeps the element alive and unaliased.
        unsafe {
            if self.double {
                *(self.ptr as *const f64)
            } else {
                *(self.ptr as *const f32) as f64
            }
        }
    }

    /// `t.copy_(value)`: stored rounded to the tensor's dtype.
    pub fn set(&self, value: f64) {
        // SAFETY: as in `get`.
        unsafe {
            if self.double {
                *(self.ptr as *mut f64) = value;
            } else {
                *(self.ptr as *mut f32) = value as f32;
            }
        }
    }

    /// `t *= factor` (a Python float) in the tensor's dtype; returns the new value.
    pub fn mul(&self, factor: f64) -> f64 {
        let v = if self.double {
            self.get() * factor
        } else {
            (self.get() as f32 * factor as f32) as f64
        };
        self.set(v);
        v
    }

    /// `step_t += 1` in the counter's own dtype, as torch does; returns the new value.
    pub fn bump(&self) -> f64 {
        let v = if self.double {
            self.get() + 1.0
        } else {
            (self.get() as f32 + 1.0) as f64
        };
        self.set(v);
        v
    }
}
