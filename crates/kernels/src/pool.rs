//! A rayon pool that survives `fork()`.
//!
//! DataLoader workers are forked from a process whose pool threads do not exist in the child;
//! using the parent's pool there would wait forever. The pool remembers the pid that built it
//! and a child builds its own on first use (the parent's is leaked, never joined), the same
//! remedy tokenizers applies to its rayon pool.

use std::sync::{Arc, Mutex};

use crate::KernelError;

struct Held {
    pid: u32,
    threads: usize,
    pool: Arc<rayon::ThreadPool>,
}

static POOL: Mutex<Option<Held>> = Mutex::new(None);

/// The pool for `threads` workers in this process, built (again) when missing, when the
/// thread count changed, or when this process is a fork of the one that built it.
pub fn get(threads: usize) -> Result<Arc<rayon::ThreadPool>, KernelError> {
    let threads = threads.max(1);
    let pid = std::process::id();
    let mut held = POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(h) = held.as_ref() {
        if h.pid == pid && h.threads == threads {
            return Ok(h.pool.clone());
        }
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("ferrotorch-{i}"))
        .build()
        .map_err(|e| KernelError::Pool(e.to_string()))?;
    let pool = Arc::new(pool);
    if let Some(old) = held.replace(Held {
        pid,
        threads,
        pool: pool.clone(),
    }) {
        if old.pid != pid {
            // Its threads belong to the parent process: dropping it here could block.
            std::mem::forget(old);
        }
    }
    Ok(pool)
}
