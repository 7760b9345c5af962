//! The model's configuration ([`Cfg`]), the per-forward constants ([`Run`]: batch shape,
//! dropout seeds), the walk over the parameter list in its fixed order ([`P`]) and the
//! input check.

use ferrotorch_kernels::vit::Dropout;
use tch::Tensor;

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

pub(super) fn check_input(cfg: &Cfg, x: &Tensor) -> Result<(i64, i64, i64, i64)> {
    let size = x.size();
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
    if ph <= 0 || pw <= 0 || hh % ph != 0 || ww % pw != 0 {
        return Err(Error::Value(format!(
            "ViT: image size {hh}x{ww} is not divisible by the patch size {ph}x{pw}"
        )));
    }
    Ok((b, c, hh, ww))
}
