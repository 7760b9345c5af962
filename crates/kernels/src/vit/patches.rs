//! Patch extraction and its gradient scatter.

use super::*;

/// Patch extraction, vit-pytorch's `b c (h p1) (w p2) -> b (h w) (p1 p2 c)`: one row of
/// `patches` per (image, patch). With `backward`, the same map scatters a patch gradient
/// back into the image gradient (each pixel belongs to exactly one patch).
pub struct Patches {
    pub img: Ptr,
    pub patches: Ptr,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub ph: usize,
    pub pw: usize,
    pub backward: bool,
}

impl RowOp for Patches {
    #[inline(always)]
    fn rows<E: VElem>(&self, r0: usize, r1: usize) -> Vec<f64> {
        let (c, h, w, ph, pw) = (self.c, self.h, self.w, self.ph, self.pw);
        let (gw, np, pd) = (w / pw, (h / ph) * (w / pw), ph * pw * c);
        // SAFETY: `patches`'s contract; rows r0..r1 own disjoint pixels and patch rows.
        let rows = unsafe { self.patches.rows::<E>(r0, r1, pd) };
        for (k, row) in rows.chunks_exact_mut(pd).enumerate() {
            let (bi, pi) = ((r0 + k) / np, (r0 + k) % np);
            let (y0, x0) = ((pi / gw) * ph, (pi % gw) * pw);
            for p1 in 0..ph {
                for ch in 0..c {
                    let start = ((bi * c + ch) * h + y0 + p1) * w + x0;
                    let slots = (0..pw).map(|p2| (p1 * pw + p2) * c + ch);
                    // SAFETY: start + pw <= B * C * H * W by the caller's shape checks; the
                    // image is only written in backward, where each row owns its pixels.
                    unsafe {
                        let px = (self.img.0 as *mut E).add(start);
                        for (p2, slot) in slots.enumerate() {
                            if self.backward {
                                *px.add(p2) = row[slot];
                            } else {
                                row[slot] = *px.add(p2);
                            }
                        }
                    }
                }
            }
        }
        Vec::new()
    }
}

/// Gathers patches from images (or, with `op.backward`, scatters their gradient back).
///
/// # Safety
/// `img`: `b * c * h * w` elements of `dtype`, `patches`: `b * (h / ph) * (w / pw) * ph * pw * c`,
/// not overlapping; `h % ph == 0`, `w % pw == 0`.
pub unsafe fn patches(op: &Patches, dtype: DType, b: usize, threads: usize, exec: &dyn Executor) {
    let rows = b * (op.h / op.ph.max(1)) * (op.w / op.pw.max(1));
    par_rows(op, dtype, rows, op.ph * op.pw * op.c, threads, exec);
}
