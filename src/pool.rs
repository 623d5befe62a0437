//! A fixed pool of worker threads fed by one queue.
//!
//! Used twice: each backend has its own pool, so that a backend that hangs only ties up its
//! own threads (the broadcaster stops sending it work once it is degraded); and the FUSE
//! adapter hands every request to a pool so the thread reading from the kernel never waits
//! for backend I/O. Threads end when the pool is
//! dropped and their queue drains; a thread stuck in a hung call is left to finish (or to
//! die with the process) rather than joined, so dropping a pool never blocks.

use crossbeam::channel::{self, Sender};

/// A unit of work.
pub type Job = Box<dyn FnOnce() + Send + 'static>;

/// Worker threads fed by one queue.
pub struct WorkerPool {
    tx: Sender<Job>,
}

impl WorkerPool {
    /// Starts `threads` workers named after `label`.
    pub fn new(label: &str, threads: usize) -> WorkerPool {
        let (tx, rx) = channel::unbounded::<Job>();
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let name: String = format!("{label}-{i}").chars().take(15).collect();
            std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                })
                .expect("spawn backend worker");
        }
        WorkerPool { tx }
    }

    /// Queues a job; it runs on one of the pool's threads.
    pub fn submit(&self, job: Job) {
        // The receivers live as long as the workers, which only stop when `tx` is dropped.
        let _ = self.tx.send(job);
    }
}
