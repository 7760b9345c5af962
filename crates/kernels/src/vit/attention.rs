//! Multi-head self-attention, one (batch, head) pair at a time in cache.

use std::ops::Range;

use super::*;

/// In-place softmax of the first `n` entries of a row padded to a multiple of 16 (the
/// padding ends as 0): a max pass, then exp and sum in one pass, then the scaling. Whole
/// 16-lane vectors throughout, the padding masked in registers; a scalar tail per pass cost
/// as much as the vectors on 65-token rows.
#[inline(always)]
fn softmax_row<T: Act>(row: &mut [T], n: usize) {
    debug_assert!(row.len().is_multiple_of(LANES) && n <= row.len());
    let (ninf, zero) = (T::of(f64::NEG_INFINITY), T::of(0.0));
    let mut mx = [ninf; LANES];
    for (j0, c) in (0..).step_by(LANES).zip(row.chunks_exact(LANES)) {
        for (l, (a, x)) in mx.iter_mut().zip(c).enumerate() {
            *a = a.fmax(if j0 + l < n { *x } else { ninf });
        }
    }
    let m = tree(mx, |a, b| a.fmax(b));
    let mut acc = [zero; LANES];
    for (j0, c) in (0..).step_by(LANES).zip(row.chunks_exact_mut(LANES)) {
        for (l, (a, x)) in acc.iter_mut().zip(c.iter_mut()).enumerate() {
            *x = if j0 + l < n { (*x - m).exp() } else { zero };
            *a = *a + *x;
        }
    }
    let inv = T::of(1.0) / hsum(acc);
    for x in row.iter_mut() {
        *x = *x * inv;
    }
}

/// `dst (cols × ld_dst) = src (rows × cols, row stride ld_src)` transposed.
#[inline(always)]
fn transpose<T: Copy>(
    src: &[T],
    rows: usize,
    cols: usize,
    ld_src: usize,
    dst: &mut [T],
    ld_dst: usize,
) {
    for (c, drow) in dst.chunks_exact_mut(ld_dst).take(cols).enumerate() {
        for (r, x) in drow[..rows].iter_mut().enumerate() {
            *x = src[r * ld_src + c];
        }
    }
}

/// Multi-head self-attention on one `qkv` activation, one (batch, head) pair at a time with
/// everything in cache: `o = dropout(softmax(scale * q k^T)) v`. `qkv` is the qkv Linear's
/// output as it comes, `(B, N, 3, H, dh)`; `o` is written merged, `(B, N, H * dh)`, ready
/// for the output projection, so no permute copies are needed. The attention matrix is
/// never stored: the backward pass recomputes it from `q` and `k`. Dropout element
/// `((b * H + h) * N + i) * N + j` matches a mask over the `(B, H, N, N)` attention.
#[derive(Clone, Copy)]
pub struct Attention {
    pub qkv: Ptr,
    pub b: usize,
    pub n: usize,
    pub heads: usize,
    pub dh: usize,
    pub scale: f64,
    pub dropout: Dropout,
}

/// Register-blocked small matmul: `c (m × np) = a (m × kd) · b (kd × np)`. `b` and `c` are
/// row-major with strides `ldb`, `ldc`; `a` is row-major with stride `lda`, or with `AT`
/// its transpose (element `(i, k)` at `a[k * lda + i]`). `np` must be a multiple of 16
/// (callers zero-pad). Blocks of 4 rows × 32 (or 16) columns stay in registers across the
/// whole `k` loop.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: Act, const AT: bool>(
    m: usize,
    np: usize,
    kd: usize,
    a: &[T],
    lda: usize,
    b: &[T],
    ldb: usize,
    c: &mut [T],
    ldc: usize,
) {
    let mut i = 0;
    while i + 4 <= m {
        gemm_rows::<T, AT, 4>(i, np, kd, a, lda, b, ldb, c, ldc);
        i += 4;
    }
    while i < m {
        gemm_rows::<T, AT, 1>(i, np, kd, a, lda, b, ldb, c, ldc);
        i += 1;
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gemm_rows<T: Act, const AT: bool, const MR: usize>(
    i0: usize,
    np: usize,
    kd: usize,
    a: &[T],
    lda: usize,
    b: &[T],
    ldb: usize,
    c: &mut [T],
    ldc: usize,
) {
    let mut j0 = 0;
    while j0 < np {
        gemm_block::<T, AT, MR, 16>(i0, j0, kd, a, lda, b, ldb, c, ldc);
        j0 += 16;
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gemm_block<T: Act, const AT: bool, const MR: usize, const NR: usize>(
    i0: usize,
    j0: usize,
    kd: usize,
    a: &[T],
    lda: usize,
    b: &[T],
    ldb: usize,
    c: &mut [T],
    ldc: usize,
) {
    let mut acc = [[T::of(0.0); NR]; MR];
    if kd == 0 {
        for (r, accr) in acc.iter().enumerate() {
            c[(i0 + r) * ldc + j0..][..NR].copy_from_slice(accr);
        }
        return;
    }
    // Bounds are checked once here, so the k loop runs without per-element checks.
    let b_last = (kd - 1) * ldb + j0 + NR;
    let a_last = if AT {
        (kd - 1) * lda + i0 + MR
    } else {
        (i0 + MR - 1) * lda + kd
    };
    assert!(
        b_last <= b.len() && a_last <= a.len(),
        "gemm: operand too short"
    );
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    for k in 0..kd {
        // SAFETY: k < kd, r < MR and the asserts above bound every index.
        unsafe {
            let brow = &*(bp.add(k * ldb + j0) as *const [T; NR]);
            for (r, accr) in acc.iter_mut().enumerate() {
                let av = if AT {
                    *ap.add(k * lda + i0 + r)
                } else {
                    *ap.add((i0 + r) * lda + k)
                };
                for (x, &bv) in accr.iter_mut().zip(brow) {
                    *x = av.mul_add(bv, *x);
                }
            }
        }
    }
    for (r, accr) in acc.iter().enumerate() {
        c[(i0 + r) * ldc + j0..][..NR].copy_from_slice(accr);
    }
}

fn pad16(x: usize) -> usize {
    x.div_ceil(16) * 16
}

/// Per-(batch, head) buffers in the arithmetic type; rows padded to `np` (tokens) or `dp`
/// (head dim) columns, both multiples of 16, with zeros in the padding.
struct Head<T> {
    np: usize,
    dp: usize,
    /// q, k, v as rows `(N, dp)`.
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    /// k and v transposed, `(dh, np)`.
    kt: Vec<T>,
    vt: Vec<T>,
    /// `(N, np)` scratch: probabilities, dropped probabilities, their gradients.
    p: Vec<T>,
    pd: Vec<T>,
    dp_: Vec<T>,
    /// `(N, dp)` scratch: output / output gradient and the q, k, v gradients.
    o: Vec<T>,
    dq: Vec<T>,
    dk: Vec<T>,
    dv: Vec<T>,
}

impl Attention {
    /// Offset of head `h` of token `i` in a merged `(B, N, H * dh)` buffer (`o`, `g_o`).
    fn merged(&self, b: usize, i: usize, h: usize) -> usize {
        (b * self.n + i) * self.heads * self.dh + h * self.dh
    }

    /// Elements of `qkv` and of its gradient, `(B, N, 3, H, dh)`.
    fn qkv_len(&self) -> usize {
        self.b * self.n * 3 * self.heads * self.dh
    }

    fn at(&self, b: usize, i: usize, part: usize, h: usize) -> usize {
        ((b * self.n + i) * 3 + part) * self.heads * self.dh + h * self.dh
    }

    fn head_buffers<T: Act>(&self) -> Head<T> {
        let (np, dp) = (pad16(self.n), pad16(self.dh));
        let z = T::of(0.0);
        Head {
            np,
            dp,
            q: vec![z; self.n * dp],
            k: vec![z; self.n * dp],
            v: vec![z; self.n * dp],
            kt: vec![z; self.dh * np],
            vt: vec![z; self.dh * np],
            p: vec![z; self.n * np],
            pd: vec![z; self.n * np],
            dp_: vec![z; self.n * np],
            o: vec![z; self.n * dp],
            dq: vec![z; self.n * dp],
            dk: vec![z; self.n * dp],
            dv: vec![z; self.n * dp],
        }
    }

    /// Loads head `h` from one batch element's `(N, 3, H, dh)` block of qkv: q (pre-multiplied
    /// by the scale, so `q k^T` is already scaled), k, v as rows, and k (and v) transposed.
    #[inline(always)]
    fn load_head<E: VElem>(&self, block: &[E], h: usize, hd: &mut Head<E::Op>, need_vt: bool) {
        let (n, dh, np, dp) = (self.n, self.dh, hd.np, hd.dp);
        let scale = E::Op::of(self.scale);
        let tok = 3 * self.heads * dh;
        let base = &block[h * dh..];
        for (i, ((qr, kr), vr)) in
            hd.q.chunks_exact_mut(dp)
                .zip(hd.k.chunks_exact_mut(dp))
                .zip(hd.v.chunks_exact_mut(dp))
                .enumerate()
                .take(n)
        {
            let src = &base[i * tok..];
            let stride = self.heads * dh;
            for (x, e) in qr[..dh].iter_mut().zip(&src[..dh]) {
                *x = e.load() * scale;
            }
            for (x, e) in kr[..dh].iter_mut().zip(&src[stride..stride + dh]) {
                *x = e.load();
            }
            for (x, e) in vr[..dh].iter_mut().zip(&src[2 * stride..2 * stride + dh]) {
                *x = e.load();
            }
        }
        transpose(&hd.k, n, dh, dp, &mut hd.kt, np);
        if need_vt {
            transpose(&hd.v, n, dh, dp, &mut hd.vt, np);
        }
    }

    /// `p = softmax(scale * q k^T)` row by row (padding columns 0), and `pd = p * mask`
    /// when dropout is on.
    #[inline(always)]
    fn probs<T: Act>(&self, hd: &mut Head<T>, u: usize, mask: &Mask<T>) {
        let (n, dh, np, dp) = (self.n, self.dh, hd.np, hd.dp);
        gemm::<T, false>(n, np, dh, &hd.q, dp, &hd.kt, np, &mut hd.p, np);
        for (i, row) in hd.p.chunks_exact_mut(np).enumerate() {
            // (Writing -inf into the padding and loading it back as part of a vector stalled
            // on store forwarding: the softmax took twice as long.)
            softmax_row(row, n);
            let row = &row[..n];
            if mask.on {
                let base = (u * n + i) * n;
                let drow = &mut hd.pd[i * np..][..n];
                for (j, (d, x)) in drow.iter_mut().zip(row.iter()).enumerate() {
                    *d = *x * mask.at(base + j);
                }
            }
        }
    }
}

/// The forward pass over heads `u0..u1` (u = b * H + h).
struct AttnFwd {
    a: Attention,
    o: Ptr,
}

impl RowOp for AttnFwd {
    #[inline(always)]
    fn rows<E: VElem>(&self, u0: usize, u1: usize) -> Vec<f64> {
        let a = &self.a;
        let (n, dh) = (a.n, a.dh);
        let hdh = a.heads * dh;
        // SAFETY: `attention`'s contract; heads write disjoint column blocks of `o`.
        let qkv = unsafe { a.qkv.all::<E>(a.qkv_len()) };
        let o_all = unsafe { a.o_all::<E>(self.o) };
        let mask = Mask::<E::Op>::of(a.dropout);
        let mut hd = a.head_buffers::<E::Op>();
        let (np, dp) = (hd.np, hd.dp);
        let mut out = vec![E::store(E::Op::of(0.0)); n * hdh];
        let mut block = Vec::with_capacity(n * 3 * hdh);
        for (b, heads) in a.batches(u0, u1) {
            // one sequential read of the batch element's rows, then every head from cache:
            // head by head, the rows' 3 KB stride defeated the prefetchers (20% of the time)
            block.clear();
            block.extend_from_slice(&qkv[b * n * 3 * hdh..][..n * 3 * hdh]);
            for h in heads.clone() {
                a.load_head::<E>(&block, h, &mut hd, false);
                a.probs(&mut hd, b * a.heads + h, &mask);
                let p = if mask.on { &hd.pd } else { &hd.p };
                gemm::<E::Op, false>(n, dp, n, p, np, &hd.v, dp, &mut hd.o, dp);
                for (row, x) in out.chunks_exact_mut(hdh).zip(hd.o.chunks_exact(dp)) {
                    for (o, x) in row[h * dh..][..dh].iter_mut().zip(&x[..dh]) {
                        *o = E::store(*x);
                    }
                }
            }
            let cols = heads.start * dh..heads.end * dh;
            for (i, row) in out.chunks_exact(hdh).enumerate() {
                o_all[a.merged(b, i, 0)..][cols.clone()].copy_from_slice(&row[cols.clone()]);
            }
        }
        Vec::new()
    }
}

impl Attention {
    /// Each batch element among units `u0..u1` (u = b * H + h) with the heads of it they
    /// cover. A unit reads and writes only its batch element's block: read whole (one
    /// sequential stream, then every head from cache), written back as the columns of its
    /// heads, row by row. (An iterator, not a closure: a closure's body is compiled without
    /// the caller's target features, and the kernels ran 7x slower.)
    #[inline(always)]
    fn batches(&self, u0: usize, u1: usize) -> impl Iterator<Item = (usize, Range<usize>)> {
        let heads = self.heads;
        std::iter::successors(Some(u0), move |&u| Some((u / heads + 1) * heads))
            .take_while(move |&u| u < u1)
            .map(move |u| {
                let b = u / heads;
                (b, u % heads..(u1 - b * heads).min(heads))
            })
    }

    /// `(B, N, H * dh)` output or output-gradient buffer.
    #[allow(clippy::mut_from_ref)]
    unsafe fn o_all<'a, E>(&self, o: Ptr) -> &'a mut [E] {
        std::slice::from_raw_parts_mut(o.0 as *mut E, self.b * self.n * self.heads * self.dh)
    }
}

/// The backward pass over heads `u0..u1`: reads `g_o`, writes `g_qkv` (same layout as qkv).
struct AttnBwd {
    a: Attention,
    g_o: Ptr,
    g_qkv: Ptr,
}

impl RowOp for AttnBwd {
    #[inline(always)]
    fn rows<E: VElem>(&self, u0: usize, u1: usize) -> Vec<f64> {
        let a = &self.a;
        let (n, dh) = (a.n, a.dh);
        let hdh = a.heads * dh;
        // SAFETY: `attention_backward`'s contract; heads write disjoint blocks of `g_qkv`.
        let qkv = unsafe { a.qkv.all::<E>(a.qkv_len()) };
        let g_o = unsafe { a.o_all::<E>(self.g_o) };
        let g_qkv = unsafe { std::slice::from_raw_parts_mut(self.g_qkv.0 as *mut E, a.qkv_len()) };
        let mask = Mask::<E::Op>::of(a.dropout);
        let scale = E::Op::of(a.scale);
        let mut hd = a.head_buffers::<E::Op>();
        let (np, dp) = (hd.np, hd.dp);
        let mut out = vec![E::store(E::Op::of(0.0)); n * 3 * hdh];
        let (mut block, mut g_block) =
            (Vec::with_capacity(n * 3 * hdh), Vec::with_capacity(n * hdh));
        for (b, heads) in a.batches(u0, u1) {
            // as in the forward pass: the batch element's rows read once, in order
            block.clear();
            block.extend_from_slice(&qkv[b * n * 3 * hdh..][..n * 3 * hdh]);
            g_block.clear();
            g_block.extend_from_slice(&g_o[b * n * hdh..][..n * hdh]);
            for h in heads.clone() {
                let u = b * a.heads + h;
                a.load_head::<E>(&block, h, &mut hd, true);
                a.probs(&mut hd, u, &mask);
                // dO into hd.o (rows of dp)
                for (x, g) in hd.o.chunks_exact_mut(dp).zip(g_block.chunks_exact(hdh)) {
                    for (x, g) in x[..dh].iter_mut().zip(&g[h * dh..][..dh]) {
                        *x = g.load();
                    }
                }
                // d(dropped p) = dO v^T ; dV = (dropped p)^T dO
                gemm::<E::Op, false>(n, np, dh, &hd.o, dp, &hd.vt, np, &mut hd.dp_, np);
                let pd = if mask.on { &hd.pd } else { &hd.p };
                gemm::<E::Op, true>(n, dp, n, pd, np, &hd.o, dp, &mut hd.dv, dp);
                // dS = scale * p * (dp - sum(dp * p)), dp = d(dropped p) * mask
                for (i, (drow, prow)) in hd
                    .dp_
                    .chunks_exact_mut(np)
                    .zip(hd.p.chunks_exact(np))
                    .enumerate()
                {
                    let (drow, prow) = (&mut drow[..n], &prow[..n]);
                    if mask.on {
                        let base = (u * n + i) * n;
                        for (j, x) in drow.iter_mut().enumerate() {
                            *x = *x * mask.at(base + j);
                        }
                    }
                    let mut s = E::Op::of(0.0);
                    let mut acc = [E::Op::of(0.0); LANES];
                    let (mut dc, mut pc) = (drow.chunks_exact(LANES), prow.chunks_exact(LANES));
                    for (d16, p16) in (&mut dc).zip(&mut pc) {
                        for ((a, dv), pv) in acc.iter_mut().zip(d16).zip(p16) {
                            *a = dv.mul_add(*pv, *a);
                        }
                    }
                    for (dv, pv) in dc.remainder().iter().zip(pc.remainder()) {
                        s = dv.mul_add(*pv, s);
                    }
                    let s = s + hsum(acc);
                    // (the scale sits in q: dK = dS^T (scale q), dQ = scale dS k)
                    for (x, &pj) in drow.iter_mut().zip(prow) {
                        *x = pj * (*x - s);
                    }
                }
                // dQ = dS k ; dK = dS^T q
                gemm::<E::Op, false>(n, dp, n, &hd.dp_, np, &hd.k, dp, &mut hd.dq, dp);
                gemm::<E::Op, true>(n, dp, n, &hd.dp_, np, &hd.q, dp, &mut hd.dk, dp);
                for (i, row) in out.chunks_exact_mut(3 * hdh).enumerate() {
                    let (q, rest) = row.split_at_mut(hdh);
                    let (k, v) = rest.split_at_mut(hdh);
                    for (o, x) in q[h * dh..][..dh].iter_mut().zip(&hd.dq[i * dp..][..dh]) {
                        *o = E::store(*x * scale);
                    }
                    for (dst, src) in [(k, &hd.dk), (v, &hd.dv)] {
                        for (o, x) in dst[h * dh..][..dh].iter_mut().zip(&src[i * dp..][..dh]) {
                            *o = E::store(*x);
                        }
                    }
                }
            }
            let cols = heads.start * dh..heads.end * dh;
            for (i, row) in out.chunks_exact(3 * hdh).enumerate() {
                for part in 0..3 {
                    let src = &row[part * hdh..][cols.clone()];
                    g_qkv[a.at(b, i, part, 0)..][cols.clone()].copy_from_slice(src);
                }
            }
        }
        Vec::new()
    }
}

/// Attention forward: writes `o` (`B * N * H * dh` elements).
///
/// # Safety
/// `a.qkv`: `B * N * 3 * H * dh` elements of `dtype`; `o` as said; no overlap.
pub unsafe fn attention(a: &Attention, o: Ptr, dtype: DType, threads: usize, exec: &dyn Executor) {
    let op = AttnFwd { a: *a, o };
    par_units(&op, dtype, a.b * a.heads, threads, exec);
}

/// Attention backward: writes `g_qkv` (shaped like qkv) from `g_o` (shaped like `o`).
///
/// # Safety
/// As [`attention`]; `g_o` shaped like `o`, `g_qkv` like `qkv`; no overlap.
pub unsafe fn attention_backward(
    a: &Attention,
    g_o: Ptr,
    g_qkv: Ptr,
    dtype: DType,
    threads: usize,
    exec: &dyn Executor,
) {
    let op = AttnBwd { a: *a, g_o, g_qkv };
    par_units(&op, dtype, a.b * a.heads, threads, exec);
}
