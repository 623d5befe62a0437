//! Scrub: verify every object on every optimal backend while the mount serves, and repair
//! bad copies from good ones.
//!
//! A scrub lists the keys of every optimal backend, and for each key reads the whole object
//! from each of them, which verifies its checksum (see [`crate::store::ChecksumStore`]).
//! Under the lock that excludes writes to the key (given by the fs layer through
//! [`Mirror::set_key_locker`], so that a write in flight is never taken for damage):
//!
//! - a copy that fails its checksum, or is missing while others hold the object, is
//!   rewritten from a good copy and counted as repaired (and as a checksum error of its
//!   backend when it failed its checksum);
//! - good copies that differ from each other are made equal to the first backend's (in
//!   mount order) and counted as repaired; this does not happen unless something other than
//!   mirrorfs changed a backend;
//! - a key with no good copy anywhere is counted as unrecoverable and left as it is.
//!
//! A scrub only reads from and writes to optimal backends, never deletes an object and never
//! touches the superblocks or the missed-key logs, so what a degraded member is recorded as
//! missing is kept. It yields to the mount: whenever writes happened while it checked a key,
//! it sleeps as long as that key took, so it takes at most about half of the I/O. One scrub
//! runs at a time; its progress and last summary are part of `status`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use log::{error, info, warn};

use super::{Backend, Mirror};
use crate::store::{object_keys, ObjectCopy};

/// Runs `f` while holding the lock that excludes writes to the object at a key (used by
/// scrub and by recovery).
pub type KeyLocker = dyn Fn(&str, &mut dyn FnMut()) + Send + Sync;

/// Progress and outcome of a scrub.
#[derive(Debug)]
pub struct ScrubProgress {
    pub started: Instant,
    pub objects_total: AtomicU64,
    pub objects_done: AtomicU64,
    pub bytes_done: AtomicU64,
    /// Copies rewritten from a good one.
    pub repaired: AtomicU64,
    /// Keys with no good copy on any optimal backend.
    pub unrecoverable: AtomicU64,
    /// Reads or writes that failed with an I/O error (the key was skipped).
    pub errors: AtomicU64,
    pub running: AtomicBool,
    /// Seconds the scrub took, once it has finished.
    pub seconds: AtomicU64,
}

impl ScrubProgress {
    fn new() -> ScrubProgress {
        ScrubProgress {
            started: Instant::now(),
            objects_total: AtomicU64::new(0),
            objects_done: AtomicU64::new(0),
            bytes_done: AtomicU64::new(0),
            repaired: AtomicU64::new(0),
            unrecoverable: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            running: AtomicBool::new(true),
            seconds: AtomicU64::new(0),
        }
    }

    /// Bytes verified per second since the start.
    pub fn rate(&self) -> u64 {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        (self.bytes_done.load(Ordering::Relaxed) as f64 / secs) as u64
    }
}

impl Mirror {
    /// Installs the function that serialises a key's check with the writes to it.
    pub fn set_key_locker(&self, locker: Arc<KeyLocker>) {
        let _ = self.key_locker.set(locker);
    }

    /// The running scrub, or the last one.
    pub fn scrub_progress(&self) -> Option<Arc<ScrubProgress>> {
        self.scrub.lock().clone()
    }

    /// Starts a scrub in the background. Fails when one runs already or the mount is
    /// read-only (a scrub repairs).
    pub fn start_scrub(self: &Arc<Self>) -> Result<Arc<ScrubProgress>, String> {
        if self.opts.read_only {
            return Err("the mount is read-only".into());
        }
        let mut slot = self.scrub.lock();
        if slot
            .as_ref()
            .is_some_and(|p| p.running.load(Ordering::Relaxed))
        {
            return Err("a scrub is already running".into());
        }
        let progress = Arc::new(ScrubProgress::new());
        *slot = Some(Arc::clone(&progress));
        drop(slot);
        let mirror = Arc::clone(self);
        let p = Arc::clone(&progress);
        std::thread::Builder::new()
            .name("scrub".into())
            .spawn(move || {
                info!("scrub started");
                if let Err(e) = mirror.run_scrub(&p) {
                    error!("scrub stopped: {e}");
                    p.errors.fetch_add(1, Ordering::Relaxed);
                }
                p.seconds
                    .store(p.started.elapsed().as_secs(), Ordering::Relaxed);
                p.running.store(false, Ordering::Relaxed);
                info!(
                    "scrub finished: {} objects checked, {} repaired, {} unrecoverable, \
                     {} errors, {} bytes in {:.1}s",
                    p.objects_done.load(Ordering::Relaxed),
                    p.repaired.load(Ordering::Relaxed),
                    p.unrecoverable.load(Ordering::Relaxed),
                    p.errors.load(Ordering::Relaxed),
                    p.bytes_done.load(Ordering::Relaxed),
                    p.started.elapsed().as_secs_f64()
                );
            })
            .map_err(|e| format!("cannot start the scrub: {e}"))?;
        Ok(progress)
    }

    fn run_scrub(&self, progress: &ScrubProgress) -> Result<(), String> {
        let optimal = self.optimal();
        let keys = object_keys(
            optimal
                .iter()
                .map(|b| (b.location.as_str(), b.store.as_ref())),
        )?;
        progress
            .objects_total
            .store(keys.len() as u64, Ordering::Relaxed);
        for key in &keys {
            let busy_before = self.foreground.load(Ordering::Relaxed);
            let started = Instant::now();
            let mut check = || self.scrub_key(key, progress);
            match self.key_locker.get() {
                Some(locker) => locker(key, &mut check),
                None => check(),
            }
            progress.objects_done.fetch_add(1, Ordering::Relaxed);
            if self.foreground.load(Ordering::Relaxed) != busy_before {
                std::thread::sleep(started.elapsed());
            }
        }
        Ok(())
    }

    /// Checks one key on every optimal backend and repairs what it can.
    fn scrub_key(&self, key: &str, progress: &ScrubProgress) {
        let backends = self.optimal();
        let copies: Vec<(Arc<Backend>, ObjectCopy)> = backends
            .into_iter()
            .map(|b| {
                let copy = ObjectCopy::read(b.store.as_ref(), key);
                match &copy {
                    ObjectCopy::Bad(why) => {
                        b.counters.checksum_errors.fetch_add(1, Ordering::Relaxed);
                        warn!("scrub: backend {} (member {}): {why}", b.location, b.id);
                    }
                    ObjectCopy::Failed(why) => {
                        warn!("scrub: reading {key} from {}: {why}", b.location)
                    }
                    _ => {}
                }
                (b, copy)
            })
            .collect();
        let Some(reference) = copies.iter().find_map(|(_, c)| c.good()) else {
            if copies.iter().any(|(_, c)| matches!(c, ObjectCopy::Bad(_))) {
                error!("scrub: {key}: no good copy on any backend");
                progress.unrecoverable.fetch_add(1, Ordering::Relaxed);
            }
            if copies
                .iter()
                .any(|(_, c)| matches!(c, ObjectCopy::Failed(_)))
            {
                progress.errors.fetch_add(1, Ordering::Relaxed);
            }
            // Missing everywhere: removed since it was listed.
            return;
        };
        progress.bytes_done.fetch_add(
            reference.len() as u64 * copies.len() as u64,
            Ordering::Relaxed,
        );
        for (b, copy) in &copies {
            let needs = match copy {
                ObjectCopy::Good(data) => data != reference,
                ObjectCopy::Missing | ObjectCopy::Bad(_) => true,
                ObjectCopy::Failed(_) => {
                    progress.errors.fetch_add(1, Ordering::Relaxed);
                    false
                }
            };
            if !needs {
                continue;
            }
            match b.store.put(key, reference) {
                Ok(()) => {
                    info!("scrub: repaired {key} on {}", b.location);
                    progress.repaired.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    warn!("scrub: repairing {key} on {}: {e}", b.location);
                    progress.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}
