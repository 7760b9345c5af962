//! The model's configuration ([`Cfg`]), the per-forward constants ([`Run`]: batch shape,
//! dropout seeds), the walk over the parameter list in its fixed order ([`P`]) and the
//! checks of every tensor against the configuration ([`check_input`], [`check_params`],
//! [`check_saved`]) before any kernel reads it.

use ferrotorch_kernels::vit::Dropout;
use tch::{Device, Kind, Tensor};

use crate::errors::{Error, Result};

/// The model's shape and options (fixed by the module's constructor).
#[derive(Clone, Copy, Debug)]
pub(super) struct Cfg {
    pub(super) patch: (i64, i64),
    pub(super) channels: i64,
    pub(super) dim: i64,
    pub(super) depth: usize,
    pub(super) heads: i64,
    pub(super) dim_head: i64,
    /// A cls token is prepended.
    pub(super) cls_token: bool,
    /// Pool by the cls token (else the mean of the non-cls tokens).
    pub(super) pool_cls: bool,
    pub(super) project_out: bool,
    /// vit-pytorch's LayerNorms before and after the patch Linear (timm has none).
    pub(super) patch_norm: bool,
    pub(super) qkv_bias: bool,
    /// The final LayerNorm runs on the pooled vector (timm's `fc_norm`), not on every token.
    pub(super) norm_after_pool: bool,
    pub(super) eps: f64,
    pub(super) dropout: f64,
    pub(super) emb_dropout: f64,
    /// Big CPU matmuls may use oneDNN (`torch.backends.mkldnn.enabled` when the model ran).
    pub(super) onednn: bool,
}

/// Per-forward constants: the dropout sites' seeds and the batch's shape.
#[derive(Clone, Copy, Debug)]
pub(super) struct Run {
    pub(super) b: i64,
    pub(super) c: i64,
    pub(super) hh: i64,
    pub(super) ww: i64,
    pub(super) seq: i64,
    pub(super) ncls: i64,
    pub(super) seed: u64,
    pub(super) train: bool,
}

impl Run {
    /// Dropout at site `site` (0 embedding; then 4 per layer: attention, out, ff1, ff2).
    pub(super) fn drop(&self, p: f64, site: u64) -> Dropout {
        if !self.train || p <= 0.0 {
            return Dropout::OFF;
        }
        let s = self.seed ^ site.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        // splitmix64 finalizer, so neighbouring sites get unrelated seeds
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Dropout {
            p,
            seed: z ^ (z >> 31),
        }
    }
}

/// The parameter list, walked in order.
pub(super) struct P<'a> {
    pub(super) p: &'a [Tensor],
    pub(super) i: usize,
}

impl<'a> P<'a> {
    pub(super) fn next(&mut self) -> Result<&'a Tensor> {
        let t = self.p.get(self.i).ok_or_else(|| {
            Error::Value(format!("ViT: expected more than {} parameters", self.i))
        })?;
        self.i += 1;
        Ok(t)
    }
    pub(super) fn opt(&mut self, present: bool) -> Result<Option<&'a Tensor>> {
        if present {
            Ok(Some(self.next()?))
        } else {
            Ok(None)
        }
    }
}

/// What the kernels and tch ops need to know of a tensor handed in from Python, read without
/// panicking: tch's own accessors panic on tensors without sizes, strides or storage.
pub(super) struct TensorInfo {
    pub(super) sizes: Vec<i64>,
    pub(super) kind: Kind,
    pub(super) device: Device,
}

/// Takes libtch's last error (each accessor stores the C++ exception it caught there); true
/// when there was none.
fn torch_ok() -> bool {
    // SAFETY: the error is a thread-local string libtch allocated with strdup and hands over.
    let e = unsafe { torch_sys::get_and_reset_last_err() };
    if e.is_null() {
        return true;
    }
    // SAFETY: as above; freed once, here.
    unsafe { libc::free(e.cast()) };
    false
}

/// `t`'s metadata if it is a defined, strided tensor of a supported dtype with real storage
/// (a data pointer, aligned to its dtype, for any non-empty tensor); else why not. Meta
/// tensors have no data pointer, nested and sparse ones no strides, tensors wrapped by
/// torch.func or functionalization no storage of their own.
pub(super) fn probe(t: &Tensor) -> std::result::Result<TensorInfo, String> {
    let c = t.as_ptr() as *mut torch_sys::C_tensor;
    torch_ok();
    // SAFETY (each call below): `c` is a live tensor handle; libtch catches any C++ exception
    // into its last error, which `torch_ok` reads right after.
    let defined = unsafe { torch_sys::at_defined(c) };
    if !torch_ok() || defined != 1 {
        return Err("is an undefined tensor".into());
    }
    // (`torch_ok` first, so each call's error is taken whatever it returned)
    let sparse = unsafe { torch_sys::at_is_sparse(c) };
    let sparse = !torch_ok() || sparse != 0;
    let mkldnn = unsafe { torch_sys::at_is_mkldnn(c) };
    let mkldnn = !torch_ok() || mkldnn != 0;
    if sparse || mkldnn {
        return Err("is not a strided tensor (sparse or mkldnn)".into());
    }
    let dim = unsafe { torch_sys::at_dim(c) };
    if !torch_ok() || dim > 64 {
        return Err("has no sizes (a nested or other non-strided tensor)".into());
    }
    let mut sizes = vec![0i64; dim];
    let mut strides = vec![0i64; dim];
    unsafe { torch_sys::at_shape(c, sizes.as_mut_ptr()) };
    let sized = torch_ok();
    unsafe { torch_sys::at_stride(c, strides.as_mut_ptr()) };
    let strided = torch_ok();
    if !sized || !strided {
        return Err("has no sizes or strides (a nested or other non-strided tensor)".into());
    }
    let kind = t
        .f_kind()
        .map_err(|_| "has a dtype ferrotorch does not know".to_string())?;
    let numel = sizes
        .iter()
        .try_fold(1i64, |n, &s| if s < 0 { None } else { n.checked_mul(s) })
        .ok_or("has invalid sizes")?;
    let data = unsafe { torch_sys::at_data_ptr(c) };
    if !torch_ok() {
        return Err("has no storage (a tensor wrapped by torch.func or functionalization?)".into());
    }
    if numel > 0 && data.is_null() {
        return Err("has no storage (a meta or functional tensor?)".into());
    }
    if !(data as usize).is_multiple_of(kind.elt_size_in_bytes()) {
        return Err("has a data pointer not aligned to its dtype".into());
    }
    Ok(TensorInfo {
        sizes,
        kind,
        device: t.device(),
    })
}

/// `t` as the kernels read it: its lazy negation resolved, contiguous (no copy when it
/// already is).
pub(super) fn dense(t: &Tensor) -> Result<Tensor> {
    let t = if t.f_is_neg()? {
        t.f_resolve_neg()?
    } else {
        t.shallow_clone()
    };
    Ok(t.f_contiguous()?)
}

/// torch's name of a dtype.
pub(super) fn kind_name(k: Kind) -> String {
    match k {
        Kind::Half => "torch.float16".into(),
        Kind::BFloat16 => "torch.bfloat16".into(),
        Kind::Float => "torch.float32".into(),
        Kind::Double => "torch.float64".into(),
        Kind::Int64 => "torch.int64".into(),
        Kind::Int => "torch.int32".into(),
        Kind::Bool => "torch.bool".into(),
        k => format!("{k:?}"),
    }
}

/// The dtypes the kernels and the tch path compute in.
fn float_kind(k: Kind) -> bool {
    matches!(k, Kind::Half | Kind::BFloat16 | Kind::Float | Kind::Double)
}

pub(super) fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Vulkan => "vulkan".into(),
        // libtch reports every other device type (meta, mps, xpu…) as Mps
        Device::Mps => "a device other than cpu/cuda".into(),
    }
}

fn shape_str(s: &[i64]) -> String {
    match s {
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            s.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// Configuration values the kernels index with: positive sizes, probabilities in [0, 1].
pub(super) fn check_cfg(cfg: &Cfg) -> Result<()> {
    let sizes = [
        ("channels", cfg.channels),
        ("dim", cfg.dim),
        ("heads", cfg.heads),
        ("dim_head", cfg.dim_head),
        ("patch height", cfg.patch.0),
        ("patch width", cfg.patch.1),
    ];
    for (name, v) in sizes {
        if v <= 0 {
            return Err(Error::Value(format!(
                "ViT: {name} must be positive, got {v}"
            )));
        }
    }
    for (name, p) in [("dropout", cfg.dropout), ("emb_dropout", cfg.emb_dropout)] {
        if !(0.0..=1.0).contains(&p) {
            return Err(Error::Value(format!(
                "ViT: {name} must be in [0, 1], got {p}"
            )));
        }
    }
    if cfg.pool_cls && !cfg.cls_token {
        return Err(Error::Value(
            "ViT: cls pooling needs the cls token (cls_token=True)".into(),
        ));
    }
    Ok(())
}

/// The images: a plain strided floating tensor `(batch, channels, H, W)` with storage, H and
/// W positive multiples of the patch. Returns `(b, c, hh, ww)` and the tensor's metadata.
pub(super) fn check_input(cfg: &Cfg, x: &Tensor) -> Result<((i64, i64, i64, i64), TensorInfo)> {
    check_cfg(cfg)?;
    let meta = probe(x).map_err(|why| Error::Type(format!("ViT: the images {why}")))?;
    if !float_kind(meta.kind) {
        return Err(Error::Type(format!(
            "ViT: images must be float16, bfloat16, float32 or float64, got {}",
            kind_name(meta.kind)
        )));
    }
    let size = &meta.sizes;
    if size.len() != 4 {
        return Err(Error::Value(format!(
            "ViT: expected images of shape (batch, channels, height, width), got {size:?}"
        )));
    }
    let (b, c, hh, ww) = (size[0], size[1], size[2], size[3]);
    let (ph, pw) = cfg.patch;
    if c != cfg.channels {
        return Err(Error::Value(format!(
            "ViT: expected {} channels, got {c}",
            cfg.channels
        )));
    }
    if hh <= 0 || ww <= 0 || hh % ph != 0 || ww % pw != 0 {
        return Err(Error::Value(format!(
            "ViT: image size {hh}x{ww} is not a positive multiple of the patch size {ph}x{pw}"
        )));
    }
    Ok(((b, c, hh, ww), meta))
}

/// One size in a parameter's expected shape.
#[derive(Clone, Copy)]
enum Dim {
    Fixed(i64),
    /// The MLP width of layer `l`: free, positive, the same in all three tensors using it.
    Hidden(usize),
    /// The head's classes: free, positive, the same in its weight and bias.
    Classes,
}

/// A parameter's state_dict name (`layer` prefixes `transformer.layers.{l}.`) and shape.
struct Slot {
    layer: Option<usize>,
    name: &'static str,
    shape: [Option<Dim>; 2],
}

impl Slot {
    fn name(&self) -> String {
        match self.layer {
            Some(l) => format!("transformer.layers.{l}.{}", self.name),
            None => self.name.to_string(),
        }
    }
}

/// How many parameters the configuration uses (None: more than can exist).
fn param_count(cfg: &Cfg) -> Option<usize> {
    let per_layer = 9 + usize::from(cfg.qkv_bias) + 2 * usize::from(cfg.project_out);
    let fixed = 2 + 4 * usize::from(cfg.patch_norm) + usize::from(cfg.cls_token) + 1 + 4;
    cfg.depth.checked_mul(per_layer)?.checked_add(fixed)
}

/// `ferrotorch.nn.vit._layout`: every parameter's name and expected shape, in
/// `vit_forward`'s order, for images of `hw` (the configuration checked by [`check_cfg`]).
fn layout(cfg: &Cfg, hw: (i64, i64)) -> Result<Vec<Slot>> {
    let overflow = || Error::Value("ViT: the configuration's sizes overflow".into());
    let (ph, pw) = cfg.patch;
    let dim = cfg.dim;
    let inner = cfg.heads.checked_mul(cfg.dim_head).ok_or_else(overflow)?;
    let qkv = inner.checked_mul(3).ok_or_else(overflow)?;
    let patch_dim = cfg
        .channels
        .checked_mul(ph)
        .and_then(|n| n.checked_mul(pw))
        .ok_or_else(overflow)?;
    let seq = (hw.0 / ph)
        .checked_mul(hw.1 / pw)
        .and_then(|n| n.checked_add(i64::from(cfg.cls_token)))
        .ok_or_else(overflow)?;
    let n = param_count(cfg).ok_or_else(overflow)?;
    let mut out = Vec::with_capacity(n);
    let f = |n: i64| Some(Dim::Fixed(n));
    let mut add = |layer, name, shape| out.push(Slot { layer, name, shape });
    if cfg.patch_norm {
        add(None, "to_patch_embedding.1.weight", [f(patch_dim), None]);
        add(None, "to_patch_embedding.1.bias", [f(patch_dim), None]);
    }
    add(None, "to_patch_embedding.2.weight", [f(dim), f(patch_dim)]);
    add(None, "to_patch_embedding.2.bias", [f(dim), None]);
    if cfg.patch_norm {
        add(None, "to_patch_embedding.3.weight", [f(dim), None]);
        add(None, "to_patch_embedding.3.bias", [f(dim), None]);
    }
    if cfg.cls_token {
        add(None, "cls_token", [f(1), f(dim)]);
    }
    add(None, "pos_embedding", [f(seq), f(dim)]);
    for l in 0..cfg.depth {
        let (hid, at) = (Some(Dim::Hidden(l)), Some(l));
        add(at, "0.norm.weight", [f(dim), None]);
        add(at, "0.norm.bias", [f(dim), None]);
        add(at, "0.to_qkv.weight", [f(qkv), f(dim)]);
        if cfg.qkv_bias {
            add(at, "0.to_qkv.bias", [f(qkv), None]);
        }
        if cfg.project_out {
            add(at, "0.to_out.0.weight", [f(dim), f(inner)]);
            add(at, "0.to_out.0.bias", [f(dim), None]);
        }
        add(at, "1.net.0.weight", [f(dim), None]);
        add(at, "1.net.0.bias", [f(dim), None]);
        add(at, "1.net.1.weight", [hid, f(dim)]);
        add(at, "1.net.1.bias", [hid, None]);
        add(at, "1.net.4.weight", [f(dim), hid]);
        add(at, "1.net.4.bias", [f(dim), None]);
    }
    add(None, "transformer.norm.weight", [f(dim), None]);
    add(None, "transformer.norm.bias", [f(dim), None]);
    add(None, "mlp_head.weight", [Some(Dim::Classes), f(dim)]);
    add(None, "mlp_head.bias", [Some(Dim::Classes), None]);
    Ok(out)
}

/// The sizes the configuration leaves free, as the parameters set them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Widths {
    /// Each layer's MLP width.
    pub(super) hidden: Vec<i64>,
    pub(super) classes: i64,
}

/// The state_dict name of parameter `i` (for messages).
pub(super) fn param_name(cfg: &Cfg, hw: (i64, i64), i: usize) -> String {
    match layout(cfg, hw) {
        Ok(l) if i < l.len() => format!("{i} ({})", l[i].name()),
        _ => i.to_string(),
    }
}

/// Checks `params` against [`layout`] for images of `hw`: each a defined strided tensor
/// with real storage (see [`probe`]), of `like`'s dtype and device (the images'), of exactly
/// the expected shape, the free widths positive and consistent (and equal to `fixed`'s when
/// given: backward's parameters must be shaped as forward's were). Errors name the
/// parameter's index and state_dict name, and what was expected, after `who` ("ViT" or
/// "ViT backward"). Returns the free widths.
pub(super) fn check_params(
    who: &str,
    cfg: &Cfg,
    hw: (i64, i64),
    like: (Kind, Device),
    params: &[Tensor],
    fixed: Option<&Widths>,
) -> Result<Widths> {
    let n = param_count(cfg)
        .ok_or_else(|| Error::Value("ViT: the configuration's sizes overflow".into()))?;
    if params.len() != n {
        return Err(Error::Value(format!(
            "{who}: got {} parameters, the configuration uses {n}",
            params.len()
        )));
    }
    let slots = layout(cfg, hw)?;
    let mut w = match fixed {
        Some(w) if w.hidden.len() == cfg.depth => w.clone(),
        _ => Widths {
            hidden: vec![0; cfg.depth],
            classes: 0,
        },
    };
    for (i, (slot, t)) in slots.iter().zip(params).enumerate() {
        let what = || format!("{who}: parameter {i} ({})", slot.name());
        let m = probe(t).map_err(|why| Error::Type(format!("{} {why}", what())))?;
        if m.device != like.1 {
            return Err(Error::Value(format!(
                "{} is on {}, the images on {}",
                what(),
                device_name(m.device),
                device_name(like.1)
            )));
        }
        if m.kind != like.0 {
            return Err(Error::Type(format!(
                "{} has dtype {}, expected {} (the images' dtype)",
                what(),
                kind_name(m.kind),
                kind_name(like.0)
            )));
        }
        let want: Vec<Dim> = slot.shape.iter().flatten().copied().collect();
        let mut ok = m.sizes.len() == want.len();
        for (&g, &d) in m.sizes.iter().zip(&want) {
            let free = match d {
                Dim::Fixed(e) => {
                    ok &= g == e;
                    continue;
                }
                Dim::Hidden(l) => &mut w.hidden[l],
                Dim::Classes => &mut w.classes,
            };
            if *free == 0 && g > 0 {
                *free = g;
            }
            ok &= g > 0 && g == *free;
        }
        if !ok {
            let shown: Vec<String> = want
                .iter()
                .map(|d| match *d {
                    Dim::Fixed(e) => e.to_string(),
                    Dim::Hidden(l) if w.hidden[l] > 0 => w.hidden[l].to_string(),
                    Dim::Hidden(l) => format!("mlp_dim of layer {l}"),
                    Dim::Classes if w.classes > 0 => w.classes.to_string(),
                    Dim::Classes => "num_classes".into(),
                })
                .collect();
            let shown = if shown.len() == 1 {
                format!("({},)", shown[0])
            } else {
                format!("({})", shown.join(", "))
            };
            return Err(Error::Value(format!(
                "{} has shape {}, expected {shown}",
                what(),
                shape_str(&m.sizes)
            )));
        }
    }
    Ok(w)
}

/// What forward saved for backward: each tensor's shape and dtype, in order.
pub(super) type SavedSpec = Vec<(Vec<i64>, Kind)>;

/// Checks the tensors handed back to backward against what forward saved: the same count,
/// and each a strided tensor with storage of the saved shape and dtype, on `device`.
pub(super) fn check_saved(spec: &SavedSpec, device: Device, saved: &[Tensor]) -> Result<()> {
    if spec.is_empty() {
        return Err(Error::Value(
            "ViT backward: this forward pass saved nothing (it ran as inference, \
             with infer_chunk > 0 and no dropout)"
                .into(),
        ));
    }
    if saved.len() != spec.len() {
        return Err(Error::Value(format!(
            "ViT backward: got {} saved tensors, the forward pass saved {}",
            saved.len(),
            spec.len()
        )));
    }
    for (i, ((shape, kind), t)) in spec.iter().zip(saved).enumerate() {
        let m =
            probe(t).map_err(|why| Error::Type(format!("ViT backward: saved tensor {i} {why}")))?;
        if m.device != device {
            return Err(Error::Value(format!(
                "ViT backward: saved tensor {i} is on {}, the forward pass ran on {}",
                device_name(m.device),
                device_name(device)
            )));
        }
        if m.kind != *kind {
            return Err(Error::Type(format!(
                "ViT backward: saved tensor {i} has dtype {}, the forward pass saved {}",
                kind_name(m.kind),
                kind_name(*kind)
            )));
        }
        if m.sizes != *shape {
            return Err(Error::Value(format!(
                "ViT backward: saved tensor {i} has shape {}, the forward pass saved {}",
                shape_str(&m.sizes),
                shape_str(shape)
            )));
        }
    }
    Ok(())
}

/// The logits' gradient: a strided floating tensor with storage, `(batch, classes)`, on
/// `device`.
pub(super) fn check_grad(g: &Tensor, shape: [i64; 2], device: Device) -> Result<()> {
    let m = probe(g).map_err(|why| Error::Type(format!("ViT backward: grad_logits {why}")))?;
    if !float_kind(m.kind) {
        return Err(Error::Type(format!(
            "ViT backward: grad_logits must be floating point, got {}",
            kind_name(m.kind)
        )));
    }
    if m.device != device {
        return Err(Error::Value(format!(
            "ViT backward: grad_logits is on {}, the forward pass ran on {}",
            device_name(m.device),
            device_name(device)
        )));
    }
    if m.sizes != shape {
        return Err(Error::Value(format!(
            "ViT backward: grad_logits has shape {}, expected (batch, classes) = {}",
            shape_str(&m.sizes),
            shape_str(&shape)
        )));
    }
    Ok(())
}
