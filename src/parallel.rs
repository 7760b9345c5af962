//! Threads for the kernels: torch's own OpenMP team when we can reach it.
//!
//! After `backward()` torch's OpenMP workers keep spinning for a while; a second pool (rayon)
//! would fight them for the same cores and make a step several times slower. So, like
//! torch's fused optimizers (`at::parallel_for`), the kernels run on torch's OpenMP team: the
//! `GOMP_parallel` entry point of the libgomp that torch loaded globally. In a forked child
//! (DataLoader workers) libgomp's team is gone and using it hangs, as torch itself does; there
//! the fork-safe rayon pool of the kernel crate takes over.

use std::ffi::{c_uint, c_void};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use ferrotorch_kernels::{Executor, RayonPool};

type GompParallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);

struct Gomp {
    parallel: GompParallel,
    pid: u32,
}

static GOMP: OnceLock<Option<Gomp>> = OnceLock::new();

fn gomp() -> Option<&'static Gomp> {
    GOMP.get_or_init(|| {
        let name = c"GOMP_parallel";
        // SAFETY: dlsym with RTLD_DEFAULT only looks a symbol up.
        let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
        if sym.is_null() {
            return None;
        }
        // SAFETY: GOMP_parallel has had this signature since GCC 4.9.
        let parallel = unsafe { std::mem::transmute::<*mut c_void, GompParallel>(sym) };
        Some(Gomp {
            parallel,
            pid: std::process::id(),
        })
    })
    .as_ref()
}

/// The executor the bindings hand to the kernels.
pub struct TorchThreads;

extern "C" fn trampoline(data: *mut c_void) {
    // SAFETY: `data` is the `&&dyn Fn` passed by `broadcast`, alive for the whole call.
    let task = unsafe { &*(data as *const &(dyn Fn() + Sync)) };
    // A panic must not unwind into C; the kernels do not panic, but be sure.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(task));
}

impl Executor for TorchThreads {
    fn broadcast(&self, threads: usize, task: &(dyn Fn() + Sync)) {
        match gomp() {
            Some(g) if g.pid == std::process::id() => {
                let data = &task as *const &(dyn Fn() + Sync) as *mut c_void;
                // SAFETY: the trampoline only reads `data` during this call.
                unsafe { (g.parallel)(trampoline, data, threads as c_uint, 0) }
            }
            _ => RayonPool.broadcast(threads, task),
        }
    }
}

/// Calls `f` once on each of `items`, on up to `threads` of the kernels' threads: each
/// thread takes the next item nobody has taken yet, so a late thread finds less to do.
pub fn for_each<T: Send>(items: Vec<T>, threads: usize, f: &(dyn Fn(T) + Sync)) {
    for_each_local(items, threads, &|| (), &|_, item| f(item), &|_| ());
}

/// [`for_each`] with a state of each thread's own: a thread makes it with `init` when it
/// starts, passes it to `f` with each item it takes (in increasing order of position), and
/// hands it to `done` when no item is left. Returns the states with the number of items
/// each took, one per thread that ran; a thread that panicked returns nothing, so the
/// counts then fall short of `items.len()`.
pub fn for_each_local<T: Send, L: Send>(
    items: Vec<T>,
    threads: usize,
    init: &(dyn Fn() -> L + Sync),
    f: &(dyn Fn(&mut L, T) + Sync),
    done: &(dyn Fn(&mut L) + Sync),
) -> Vec<(L, usize)> {
    let threads = threads.min(items.len()).max(1);
    if threads == 1 {
        let (mut local, n) = (init(), items.len());
        for item in items {
            f(&mut local, item);
        }
        done(&mut local);
        return vec![(local, n)];
    }
    let slots: Vec<Mutex<Option<T>>> = items.into_iter().map(|t| Mutex::new(Some(t))).collect();
    let next = AtomicUsize::new(0);
    let states = Mutex::new(Vec::with_capacity(threads));
    TorchThreads.broadcast(threads, &|| {
        let (mut local, mut taken) = (init(), 0);
        loop {
            let k = next.fetch_add(1, Ordering::Relaxed);
            let Some(slot) = slots.get(k) else { break };
            if let Some(item) = slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
                f(&mut local, item);
                taken += 1;
            }
        }
        done(&mut local);
        states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((local, taken));
    });
    states.into_inner().unwrap_or_else(|p| p.into_inner())
}

/// Whether steps run on torch's OpenMP threads (for diagnostics and tests).
pub fn uses_torch_threads() -> bool {
    gomp().is_some_and(|g| g.pid == std::process::id())
}
