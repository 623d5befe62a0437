//! A fixed pool of worker threads fed by one queue.
//!
//! Used twice: each backend has its own pool, so that a backend that hangs only ties up its
//! own threads (the broadcaster stops sending it work once it is degraded); and the FUSE
//! adapter hands every request to a pool so the thread reading from the kernel never waits
//! for backend I/O. Threads end when the pool is
//! dropped and their queue drains; a thread stuck in a hung call is left to finish (or to
//! die with the process) rather than joined, so dropping a pool never blocks.

use std::sync::Arc;
use std::time::Instant;

use crossbeam::queue::SegQueue;
use parking_lot::{Condvar, Mutex};

/// A unit of work.
pub type Job = Box<dyn FnOnce() + Send + 'static>;

/// The queue shared by a pool's workers: a lock-free queue of jobs, and a condition
/// variable on which idle workers sleep (they never spin: on a two-core machine, spinning
/// idle workers take the CPU from the ones doing I/O).
struct Shared {
    jobs: SegQueue<Job>,
    sleepers: Mutex<Sleep>,
    wake: Condvar,
}

struct Sleep {
    /// Workers waiting on `wake`.
    idle: usize,
    /// Set when the pool is dropped: workers finish the queue and exit.
    closing: bool,
}

/// Worker threads fed by one queue.
pub struct WorkerPool {
    shared: Arc<Shared>,
}

impl WorkerPool {
    /// Starts `threads` workers named after `label`.
    pub fn new(label: &str, threads: usize) -> WorkerPool {
        let shared = Arc::new(Shared {
            jobs: SegQueue::new(),
            sleepers: Mutex::new(Sleep {
                idle: 0,
                closing: false,
            }),
            wake: Condvar::new(),
        });
        for i in 0..threads.max(1) {
            let shared = Arc::clone(&shared);
            let name: String = format!("{label}-{i}").chars().take(15).collect();
            std::thread::Builder::new()
                .name(name)
                .spawn(move || worker(&shared))
                .expect("spawn worker thread");
        }
        WorkerPool { shared }
    }

    /// Queues a job; it runs on one of the pool's threads.
    pub fn submit(&self, job: Job) {
        self.shared.jobs.push(job);
        let sleep = self.shared.sleepers.lock();
        if sleep.idle > 0 {
            self.shared.wake.notify_one();
        }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.shared.sleepers.lock().closing = true;
        self.shared.wake.notify_all();
    }
}

fn worker(shared: &Shared) {
    loop {
        if let Some(job) = shared.jobs.pop() {
            job();
            continue;
        }
        let mut sleep = shared.sleepers.lock();
        // Checked again under the lock: `submit` pushes before it takes the lock, so a job
        // pushed after the failed pop above is seen here or wakes us.
        if !shared.jobs.is_empty() {
            continue;
        }
        if sleep.closing {
            return;
        }
        sleep.idle += 1;
        shared.wake.wait(&mut sleep);
        sleep.idle -= 1;
    }
}

/// The barrier of a broadcast: collects one answer per slot and lets the caller wait, up to
/// a deadline, until all of them are in. Waiting blocks on a condition variable rather than
/// spinning, which matters on small machines where spinning waiters steal the CPU from the
/// workers they wait for.
pub struct Answers<T> {
    state: Mutex<(Vec<Option<T>>, usize)>,
    all_in: Condvar,
}

impl<T> Answers<T> {
    /// Expects `n` answers.
    pub fn new(n: usize) -> Arc<Answers<T>> {
        Arc::new(Answers {
            state: Mutex::new(((0..n).map(|_| None).collect(), 0)),
            all_in: Condvar::new(),
        })
    }

    /// Records the answer for `slot`.
    pub fn put(&self, slot: usize, value: T) {
        let mut state = self.state.lock();
        state.0[slot] = Some(value);
        state.1 += 1;
        if state.1 == state.0.len() {
            self.all_in.notify_all();
        }
    }

    /// Waits until every answer is in or `deadline` passes; missing answers are `None`.
    pub fn wait(&self, deadline: Instant) -> Vec<Option<T>> {
        let mut state = self.state.lock();
        while state.1 < state.0.len() {
            if self.all_in.wait_until(&mut state, deadline).timed_out() {
                break;
            }
        }
        state.0.iter_mut().map(Option::take).collect()
    }
}
