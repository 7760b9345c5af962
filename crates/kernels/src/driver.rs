//! The one driver every algorithm shares: chunking, threads, dtype dispatch, SIMD dispatch.

use half::{bf16, f16};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::common::{PlainGrad, PreparedGrad, ReadGrad};
use crate::elem::Elem;
use crate::{pool, KernelError};

/// Most state buffers any algorithm keeps per parameter (Adam with amsgrad: 3).
pub const MAX_STATES: usize = 3;

/// Elements per unit of parallel work: large enough to amortize scheduling, small enough
/// that a few big tensors still spread over all threads.
const CHUNK: usize = 1 << 15;
/// Below this many elements in a whole call, threads cost more than they save.
const MIN_PARALLEL: usize = 1 << 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F64,
    BF16,
    F16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 => 8,
            DType::BF16 | DType::F16 => 2,
        }
    }
}

/// One parameter's buffers: `numel` dense elements of `dtype` each. `states` are in the
/// algorithm's documented order; unused slots are null.
#[derive(Clone, Copy, Debug)]
pub struct Job<T> {
    pub dtype: DType,
    pub numel: usize,
    pub param: *mut u8,
    pub grad: *mut u8,
    pub states: [*mut u8; MAX_STATES],
    /// Per-tensor values the algorithm derived from this tensor's step (bias corrections…).
    pub scalars: T,
}

// SAFETY: a Job only carries addresses; `run`'s contract makes them valid and disjoint.
unsafe impl<T: Send> Send for Job<T> {}
unsafe impl<T: Sync> Sync for Job<T> {}

/// An optimizer's element-wise update. `update` is called on disjoint chunks of one tensor;
/// it reads and writes each element of each buffer once.
pub trait Algorithm: Sync {
    /// Per-tensor scalars (derived from the step count by the caller).
    type Scalars: Copy + Send + Sync;
    /// Name used in errors.
    const NAME: &'static str;
    /// How many state buffers this configuration needs.
    fn n_states(&self) -> usize;
    /// How this configuration reads gradient elements (unscaled, clipped, negated, L2 term
    /// added), or None when a bare load does: the driver then instantiates `update` with
    /// [`PlainGrad`], so the common loop tests no settings per element.
    fn grad_reader<E: Elem>(&self) -> Option<PreparedGrad<E::Op>>;
    /// Updates one chunk, reading each gradient element through `read`.
    fn update<E: Elem, R: ReadGrad<E>>(
        &self,
        read: R,
        s: &Self::Scalars,
        param: &mut [E],
        grad: &mut [E],
        states: [&mut [E]; MAX_STATES],
    );
}

/// Runs a task on several threads at once. Each of up to `threads` workers calls `task`
/// once; the task itself pulls work from a shared counter, so a worker that starts late
/// simply finds less to do.
pub trait Executor: Sync {
    fn broadcast(&self, threads: usize, task: &(dyn Fn() + Sync));
}

/// Runs everything on the calling thread.
pub struct Serial;

impl Executor for Serial {
    fn broadcast(&self, _threads: usize, task: &(dyn Fn() + Sync)) {
        task()
    }
}

/// The fork-safe rayon pool of [`crate::pool`].
pub struct RayonPool;

impl Executor for RayonPool {
    fn broadcast(&self, threads: usize, task: &(dyn Fn() + Sync)) {
        match pool::get(threads) {
            Ok(p) => {
                p.broadcast(|_| task());
            }
            Err(_) => task(),
        }
    }
}

/// Splits buffers of the given lengths into `(buffer, begin, end)` pieces of at most
/// `CHUNK` elements.
pub fn pieces(numels: impl IntoIterator<Item = usize>) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    for (j, n) in numels.into_iter().enumerate() {
        let mut b = 0;
        while b < n {
            let e = (b + CHUNK).min(n);
            out.push((j, b, e));
            b = e;
        }
    }
    out
}

/// Calls `f(index, piece)` for every piece, spread over up to `threads` workers; returns the
/// results in piece order (so reductions over them do not depend on the thread count).
pub fn map_pieces<T: Send + Clone>(
    pieces: &[(usize, usize, usize)],
    threads: usize,
    exec: &dyn Executor,
    init: T,
    f: &(dyn Fn(usize, usize, usize) -> T + Sync),
) -> Vec<T> {
    let results = std::sync::Mutex::new(vec![init; pieces.len()]);
    let next = AtomicUsize::new(0);
    let task = || {
        let mut local = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(&(j, b, e)) = pieces.get(i) else {
                break;
            };
            local.push((i, f(j, b, e)));
        }
        let mut r = results.lock().unwrap_or_else(|p| p.into_inner());
        for (i, v) in local {
            r[i] = v;
        }
    };
    if threads > 1 && pieces.len() > 1 {
        exec.broadcast(threads.min(pieces.len()), &task);
    } else {
        task();
    }
    results.into_inner().unwrap_or_else(|p| p.into_inner())
}

/// Applies `alg` to every job, chunked over up to `threads` workers of `exec`.
///
/// # Safety
/// Every pointer of every job must be valid for reads and writes of `numel` elements of
/// `dtype` for the duration of the call, and no two buffers (within a job or across jobs)
/// may overlap. Unused state slots (index >= `alg.n_states()`) are ignored.
pub unsafe fn run<A: Algorithm>(
    alg: &A,
    jobs: &[Job<A::Scalars>],
    threads: usize,
    exec: &dyn Executor,
) -> Result<(), KernelError> {
    let n = alg.n_states();
    for job in jobs.iter().filter(|j| j.numel > 0) {
        // Empty tensors may have null data pointers; they have nothing to update.
        let got = job.states.iter().take(n).filter(|p| !p.is_null()).count();
        if got != n {
            return Err(KernelError::StateCount {
                what: A::NAME,
                expected: n,
                got,
            });
        }
    }
    let total: usize = jobs.iter().map(|j| j.numel).sum();
    if threads <= 1 || total < MIN_PARALLEL {
        run_range(alg, jobs, (0, 0), (jobs.len(), 0));
        return Ok(());
    }
    // A unit is about CHUNK consecutive elements, cut across tensors where they end: it
    // starts at element `begin` of job `first` and runs up to the start of the next unit
    // (2000 tiny tensors make ~60 units; a big tensor is cut into several).
    let mut units: Vec<(usize, usize)> = Vec::with_capacity(total / CHUNK + 2);
    let mut filled = CHUNK;
    for (j, job) in jobs.iter().enumerate() {
        let mut b = 0;
        while b < job.numel {
            if filled == CHUNK {
                units.push((j, b));
                filled = 0;
            }
            let take = (CHUNK - filled).min(job.numel - b);
            filled += take;
            b += take;
        }
    }
    let next = AtomicUsize::new(0);
    let task = || loop {
        let u = next.fetch_add(1, Ordering::Relaxed);
        let Some(&(first, begin)) = units.get(u) else {
            break;
        };
        let (last, end) = units.get(u + 1).copied().unwrap_or((jobs.len(), 0));
        // SAFETY: forwarded from the caller; units cover disjoint element ranges.
        unsafe { run_range(alg, jobs, (first, begin), (last, end)) }
    };
    exec.broadcast(threads.min(units.len()), &task);
    Ok(())
}

/// Jobs of at most this many elements are prefetched by [`Ahead`].
const SMALL_JOB: usize = 1 << 14;

/// Runs the elements from element `begin` of job `first` up to element `end` of job `last`
/// (all of the jobs from `first` on when `last` is `jobs.len()`).
///
/// # Safety
/// As [`run`], for the elements of the range.
unsafe fn run_range<A: Algorithm>(
    alg: &A,
    jobs: &[Job<A::Scalars>],
    (first, begin): (usize, usize),
    (last, end): (usize, usize),
) {
    let upto = (last + 1).min(jobs.len());
    // Small tensors are separate allocations: the hardware prefetchers lose every stream at
    // each tensor's end and start it again (page by page) at the next one's, so the next
    // small tensors' memory is requested ahead by software. (Big tensors stream well by
    // themselves; requests for them only cost time.)
    let mut ahead = Ahead::new(jobs, alg.n_states(), (first, begin), (last, end));
    for (j, job) in jobs.iter().enumerate().take(upto).skip(first) {
        let lo = if j == first { begin } else { 0 };
        let hi = if j == last { end } else { job.numel };
        if lo < hi {
            if job.numel <= SMALL_JOB {
                run_chunk(alg, job, lo, hi, Some(&mut ahead));
            } else {
                run_chunk(alg, job, lo, hi, None);
                ahead.skip(hi - lo);
            }
        }
    }
}

/// A cursor that runs [`Ahead::DISTANCE`] elements ahead of the kernel over a range of jobs
/// and asks for the memory of the small jobs' elements it passes (every buffer of their
/// job) to be brought into the cache.
struct Ahead<'a, T> {
    jobs: &'a [Job<T>],
    n_states: usize,
    job: usize,
    at: usize,
    last: usize,
    end: usize,
}

impl<'a, T> Ahead<'a, T> {
    /// Elements between the kernel and the cursor (16 KB of each fp32 buffer: far enough
    /// ahead for memory's latency, near enough that what arrives stays in the L2 cache).
    const DISTANCE: usize = 4096;
    /// Elements the kernel updates between two of the cursor's moves.
    const STRIDE: usize = 256;

    fn new(
        jobs: &'a [Job<T>],
        n_states: usize,
        (first, begin): (usize, usize),
        (last, end): (usize, usize),
    ) -> Self {
        let mut a = Ahead {
            jobs,
            n_states,
            job: first,
            at: begin,
            last,
            end,
        };
        a.skip(Self::DISTANCE);
        a
    }

    /// Moves the cursor by `n` elements, calling `visit(job, from, to)` for each piece of a
    /// job it passes.
    #[inline(always)]
    fn go(&mut self, mut n: usize, mut visit: impl FnMut(&Job<T>, usize, usize)) {
        while n > 0 && self.job <= self.last {
            let Some(job) = self.jobs.get(self.job) else {
                return;
            };
            let stop = if self.job == self.last {
                self.end.min(job.numel)
            } else {
                job.numel
            };
            if self.at >= stop {
                self.job += 1;
                self.at = 0;
                continue;
            }
            let take = n.min(stop - self.at);
            visit(job, self.at, self.at + take);
            self.at += take;
            n -= take;
        }
    }

    fn skip(&mut self, n: usize) {
        self.go(n, |_, _, _| {})
    }

    /// Prefetches the memory of the next `n` elements (every buffer of their job) and moves
    /// past them.
    #[inline(always)]
    fn fetch(&mut self, n: usize) {
        let n_bufs = 2 + self.n_states;
        self.go(n, |job, from, to| {
            if job.numel > SMALL_JOB {
                return;
            }
            let size = job.dtype.size();
            let bufs = [
                job.param,
                job.grad,
                job.states[0],
                job.states[1],
                job.states[2],
            ];
            for &p in bufs.iter().take(n_bufs) {
                prefetch_bytes(p, from * size, to * size);
            }
        })
    }
}

/// Asks for bytes `[from, to)` of the buffer at `p` to be brought into the L2 cache, one
/// request per 64-byte line. (Into L1 instead, the requests crowd out the kernel's own
/// loads: measured slower than no prefetching at all.)
#[inline(always)]
fn prefetch_bytes(p: *mut u8, from: usize, to: usize) {
    if p.is_null() {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        let start = (p as usize + from) & !63;
        let stop = p as usize + to;
        let mut a = start;
        while a < stop {
            // SAFETY: a prefetch never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(a as *const i8) };
            a += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, from, to);
}

unsafe fn run_chunk<A: Algorithm>(
    alg: &A,
    job: &Job<A::Scalars>,
    b: usize,
    e: usize,
    ahead: Option<&mut Ahead<'_, A::Scalars>>,
) {
    match job.dtype {
        DType::F32 => dispatch::<A, f32>(alg, job, b, e, ahead),
        DType::F64 => dispatch::<A, f64>(alg, job, b, e, ahead),
        DType::BF16 => dispatch::<A, bf16>(alg, job, b, e, ahead),
        DType::F16 => dispatch::<A, f16>(alg, job, b, e, ahead),
    }
}

/// The highest SIMD level a capability name allows: torch's `ATEN_CPU_CAPABILITY` values
/// (`default`, `avx2`, `avx512`); None for anything else (no cap).
pub fn capability_cap(name: &str) -> Option<u8> {
    match name.trim().to_ascii_lowercase().as_str() {
        "default" => Some(1),
        "avx2" => Some(2),
        "avx512" => Some(3),
        _ => None,
    }
}

/// 3 with AVX-512F + FMA, 2 with AVX2 + FMA, else 1 (detected once). Capped by
/// `FERROTORCH_CPU_CAPABILITY`, else by torch's `ATEN_CPU_CAPABILITY`, so that one switch
/// runs torch's and ferrotorch's AVX2 kernels on an AVX-512 machine.
pub fn simd_level() -> u8 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::atomic::{AtomicU8, Ordering};
        static HAS: AtomicU8 = AtomicU8::new(0);
        let mut has = HAS.load(Ordering::Relaxed);
        if has == 0 {
            has = if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
                3
            } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                2
            } else {
                1
            };
            let cap = ["FERROTORCH_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY"]
                .iter()
                .find_map(|k| std::env::var(k).ok().and_then(|v| capability_cap(&v)));
            has = has.min(cap.unwrap_or(3));
            HAS.store(has, Ordering::Relaxed);
        }
        has
    }
    #[cfg(not(target_arch = "x86_64"))]
    1
}

/// Work compiled once per SIMD level by [`with_simd`]. `run` must be `#[inline(always)]`,
/// so that it is compiled into each feature-enabled wrapper.
pub trait SimdWork {
    type Out;
    fn run(self) -> Self::Out;
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn with_avx512<W: SimdWork>(w: W) -> W::Out {
    w.run()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn with_avx2<W: SimdWork>(w: W) -> W::Out {
    w.run()
}

/// Runs `w` compiled for the widest level [`simd_level`] allows (AVX-512, AVX2+FMA, else
/// the baseline target). Results are identical at every level: Rust never contracts
/// `a * b + c` into an FMA on its own, and `mul_add` is exactly rounded either way (a
/// library call on the baseline).
#[inline(always)]
pub fn with_simd<W: SimdWork>(w: W) -> W::Out {
    #[cfg(target_arch = "x86_64")]
    {
        let level = simd_level();
        // SAFETY: simd_level reports only features the CPU has.
        if level == 3 {
            return unsafe { with_avx512(w) };
        }
        if level == 2 {
            return unsafe { with_avx2(w) };
        }
    }
    w.run()
}

/// One chunk of one job, as [`SimdWork`].
struct Chunk<'a, 'b, A: Algorithm, E> {
    alg: &'a A,
    job: &'a Job<A::Scalars>,
    b: usize,
    e: usize,
    ahead: Option<&'a mut Ahead<'b, A::Scalars>>,
    elem: std::marker::PhantomData<E>,
}

impl<A: Algorithm, E: Elem> SimdWork for Chunk<'_, '_, A, E> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        // SAFETY: built only by `dispatch`, whose caller upholds `chunk`'s contract.
        unsafe {
            match self.ahead {
                None => chunk::<A, E>(self.alg, self.job, self.b, self.e),
                Some(ahead) => {
                    let mut b = self.b;
                    while b < self.e {
                        let e = (b + Ahead::<A::Scalars>::STRIDE).min(self.e);
                        ahead.fetch(e - b);
                        chunk::<A, E>(self.alg, self.job, b, e);
                        b = e;
                    }
                }
            }
        }
    }
}

#[inline(always)]
unsafe fn dispatch<A: Algorithm, E: Elem>(
    alg: &A,
    job: &Job<A::Scalars>,
    b: usize,
    e: usize,
    ahead: Option<&mut Ahead<'_, A::Scalars>>,
) {
    with_simd(Chunk::<A, E> {
        alg,
        job,
        b,
        e,
        ahead,
        elem: std::marker::PhantomData,
    })
}

#[inline(always)]
unsafe fn chunk<A: Algorithm, E: Elem>(alg: &A, job: &Job<A::Scalars>, b: usize, e: usize) {
    let len = e - b;
    let slice = |p: *mut u8| -> &mut [E] {
        if p.is_null() {
            &mut []
        } else {
            std::slice::from_raw_parts_mut((p as *mut E).add(b), len)
        }
    };
    let states = [
        slice(job.states[0]),
        slice(job.states[1]),
        slice(job.states[2]),
    ];
    let (param, grad) = (slice(job.param), slice(job.grad));
    match alg.grad_reader::<E>() {
        None => alg.update::<E, _>(PlainGrad, &job.scalars, param, grad, states),
        Some(read) => alg.update::<E, _>(read, &job.scalars, param, grad, states),
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers for the kernels' unit tests: run an algorithm over owned vectors.
    use super::*;

    pub fn dtype_of<E: 'static>() -> DType {
        use std::any::TypeId;
        let t = TypeId::of::<E>();
        if t == TypeId::of::<f32>() {
            DType::F32
        } else if t == TypeId::of::<f64>() {
            DType::F64
        } else if t == TypeId::of::<bf16>() {
            DType::BF16
        } else {
            DType::F16
        }
    }

    /// One tensor: param, grad, states (as many as the algorithm needs).
    pub struct Buffers<E> {
        pub param: Vec<E>,
        pub grad: Vec<E>,
        pub states: Vec<Vec<E>>,
    }

    pub fn step<A: Algorithm, E: Elem>(
        alg: &A,
        scalars: A::Scalars,
        tensors: &mut [Buffers<E>],
        threads: usize,
    ) {
        let jobs: Vec<Job<A::Scalars>> = tensors
            .iter_mut()
            .map(|t| {
                let mut states = [std::ptr::null_mut(); MAX_STATES];
                for (slot, s) in states.iter_mut().zip(t.states.iter_mut()) {
                    *slot = s.as_mut_ptr() as *mut u8;
                }
                Job {
                    dtype: dtype_of::<E>(),
                    numel: t.param.len(),
                    param: t.param.as_mut_ptr() as *mut u8,
                    grad: t.grad.as_mut_ptr() as *mut u8,
                    states,
                    scalars,
                }
            })
            .collect();
        unsafe { run(alg, &jobs, threads, &RayonPool).unwrap() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_names_are_torchs() {
        assert_eq!(capability_cap("avx2"), Some(2));
        assert_eq!(capability_cap(" AVX512 "), Some(3));
        assert_eq!(capability_cap("default"), Some(1));
        assert_eq!(capability_cap("zvector"), None);
        assert!((1..=3).contains(&simd_level()));
    }

    /// The prefetch cursor passes every element of its range after the first
    /// `Ahead::DISTANCE`, once and in order, and nothing outside the range.
    #[test]
    fn ahead_walks_its_range_once() {
        let sizes = [0usize, 1, 1000, 5000, 0, 17, 3000, 1, 9000];
        let jobs: Vec<Job<()>> = sizes
            .iter()
            .map(|&numel| Job {
                dtype: DType::F32,
                numel,
                param: std::ptr::null_mut(),
                grad: std::ptr::null_mut(),
                states: [std::ptr::null_mut(); MAX_STATES],
                scalars: (),
            })
            .collect();
        let all: Vec<(usize, usize)> = sizes
            .iter()
            .enumerate()
            .flat_map(|(j, &n)| (0..n).map(move |i| (j, i)))
            .collect();
        for (first, begin, last, end) in [
            (0, 0, jobs.len(), 0),
            (2, 500, 7, 2000),
            (3, 4999, 3, 5000),
            (1, 0, 8, 9000),
        ] {
            let mut ahead = Ahead::new(&jobs, 0, (first, begin), (last, end));
            let mut seen = Vec::new();
            for _ in 0..300 {
                ahead.go(97, |job, from, to| {
                    let j = (job as *const Job<()>).addr() - jobs.as_ptr().addr();
                    let j = j / std::mem::size_of::<Job<()>>();
                    seen.extend((from..to).map(|i| (j, i)));
                });
            }
            let range: Vec<(usize, usize)> = all
                .iter()
                .copied()
                .filter(|&(j, i)| {
                    (j, i) >= (first, begin) && (last == jobs.len() || (j, i) < (last, end))
                })
                .collect();
            let skipped = Ahead::<()>::DISTANCE.min(range.len());
            assert_eq!(
                seen,
                range[skipped..],
                "range {first}:{begin} to {last}:{end}"
            );
        }
    }

    /// Adds 1 to every parameter element it is handed, so a count of 1 per call shows that
    /// each element was handed over exactly once.
    struct Count;
    impl Algorithm for Count {
        type Scalars = ();
        const NAME: &'static str = "count";
        fn n_states(&self) -> usize {
            0
        }
        fn grad_reader<E: Elem>(&self) -> Option<PreparedGrad<E::Op>> {
            None
        }
        fn update<E: Elem, R: ReadGrad<E>>(
            &self,
            _: R,
            _: &(),
            p: &mut [E],
            _: &mut [E],
            _: [&mut [E]; MAX_STATES],
        ) {
            for x in p.iter_mut() {
                *x = E::store(x.load() + <E::Op as crate::OpFloat>::of(1.0));
            }
        }
    }

    /// However tensors are cut into units (tiny ones grouped, big ones split, empty ones
    /// in between), every element is updated exactly once, on one thread or several.
    #[test]
    fn units_cover_every_element_once() {
        let sizes = [
            0,
            1,
            1000,
            CHUNK - 1,
            CHUNK,
            CHUNK + 1,
            0,
            3 * CHUNK + 17,
            5,
            MIN_PARALLEL,
        ];
        for threads in [1, 2, 3, 8] {
            let mut tensors: Vec<testing::Buffers<f32>> = sizes
                .iter()
                .cycle()
                .take(40)
                .map(|&n| testing::Buffers {
                    param: vec![0.0; n],
                    grad: vec![0.0; n],
                    states: vec![],
                })
                .collect();
            for round in 1..=2 {
                testing::step(&Count, (), &mut tensors, threads);
                for (i, t) in tensors.iter().enumerate() {
                    assert!(
                        t.param.iter().all(|&x| x == round as f32),
                        "threads {threads}, tensor {i} ({} elements), round {round}",
                        t.param.len()
                    );
                }
            }
        }
    }
}
