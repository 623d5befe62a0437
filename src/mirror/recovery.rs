//! Online recovery and replacement of a member.
//!
//! A recovery brings one degraded member back to the content of the optimal ones while the
//! mount keeps serving. Only one runs at a time.
//!
//! 1. Under the exclusive `switch` (so no write is half done), the member is marked
//!    *recovering*. From then on every write reaches it too, in a second phase that starts
//!    once all optimal backends have the write, holding the stripe locks of the write's keys.
//! 2. The recovery copies keys from one optimal backend (the source) to the member, each
//!    under its key's stripe lock: a copy and a write of the same key never interleave, and
//!    because a write reaches the member only after the source, the member always ends with
//!    the newest content. Which keys: those in the member's missed-key log when the log
//!    covers its whole absence (its generation is at most one behind the generation from which
//!    the log was kept); otherwise every key of the source and of the member, compared one by
//!    one ("full" mode, also used for a replacement, which starts empty).
//! 3. The last step takes the exclusive `switch` again, copies what was logged meanwhile and
//!    the other members' logs, marks the member optimal, bumps the generation, writes the
//!    superblocks (the member's included) and deletes its log. It is short: it copies only
//!    what was written since the previous pass.
//!
//! The copy throttles itself: after each object, if the mount wrote anything meanwhile, it
//! sleeps as long as the copy took, so it takes at most about half of the I/O while the mount
//! is busy and all of it while idle.
//!
//! A recovery that fails (the member or the source errs) leaves the member degraded with the
//! reason; its log is kept. The member table records a recovery under way, and the next
//! mount resumes it. Known shortcoming: the recovery thread calls the stores directly,
//! without the per-backend deadline, so a member that hangs during recovery stalls the
//! recovery (not the mount).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use log::{error, info, warn};

use super::{
    is_private_key, parse_log, read_superblock, stripe_of, Backend, BackendState, Mirror, Mutation,
    RecoverySummary,
};
use crate::layout;
use crate::store::{Store, StoreError, StoreResult};

/// Progress of a recovery, shown by status.
#[derive(Debug)]
pub struct Progress {
    pub objects_done: AtomicU64,
    pub objects_total: AtomicU64,
    pub bytes_done: AtomicU64,
    pub bytes_total: AtomicU64,
    pub started: Instant,
    /// True when every key is compared (no usable missed-key log).
    pub full: bool,
    /// Seconds after `started` of the last progress line in the log.
    last_log: AtomicU64,
}

/// Seconds between two progress lines of a recovery in the log.
const PROGRESS_LOG_INTERVAL: u64 = 10;

impl Progress {
    fn new(full: bool) -> Progress {
        Progress {
            objects_done: AtomicU64::new(0),
            objects_total: AtomicU64::new(0),
            bytes_done: AtomicU64::new(0),
            bytes_total: AtomicU64::new(0),
            started: Instant::now(),
            full,
            last_log: AtomicU64::new(0),
        }
    }

    /// Logs progress at info level, at most every [`PROGRESS_LOG_INTERVAL`].
    fn log_now(&self, member: u32, done: u64) {
        let elapsed = self.started.elapsed().as_secs();
        let last = self.last_log.load(Ordering::Relaxed);
        if elapsed < last + PROGRESS_LOG_INTERVAL {
            return;
        }
        if self
            .last_log
            .compare_exchange(last, elapsed, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            info!(
                "recovery of member {member}: {done}/{} objects, {} bytes, {} bytes/s",
                self.objects_total.load(Ordering::Relaxed),
                self.bytes_done.load(Ordering::Relaxed),
                self.rate()
            );
        }
    }

    /// Bytes copied per second since the start.
    pub fn rate(&self) -> u64 {
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        (self.bytes_done.load(Ordering::Relaxed) as f64 / secs) as u64
    }
}

fn summary(progress: &Progress, error: &str) -> RecoverySummary {
    RecoverySummary {
        objects: progress.objects_done.load(Ordering::Relaxed),
        bytes: progress.bytes_done.load(Ordering::Relaxed),
        seconds: progress.started.elapsed().as_secs_f64(),
        full_compare: progress.full,
        error: error.to_string(),
    }
}

impl Mirror {
    /// True while a recovery runs.
    pub fn recovery_running(&self) -> bool {
        self.recovery_running.load(Ordering::SeqCst)
    }

    /// Starts recovering the degraded member `id` in the background.
    pub fn start_recovery(self: &Arc<Self>, id: u32) -> Result<(), String> {
        self.start(id, false)
    }

    /// Resumes the recoveries the member table records as under way (after a restart).
    pub fn resume_recoveries(self: &Arc<Self>) {
        if self.opts.read_only {
            return;
        }
        let members = self.superblock().members;
        for m in members.iter().filter(|m| m.recovering) {
            if self.backend(m.id).is_ok() {
                info!("resuming the recovery of member {}", m.id);
                if let Err(e) = self.start(m.id, false) {
                    warn!("cannot resume the recovery of member {}: {e}", m.id);
                }
            }
        }
    }

    /// Puts an empty store in the place of member `id` and fills it online.
    pub fn replace(
        self: &Arc<Self>,
        id: u32,
        location: String,
        store: Arc<dyn Store>,
    ) -> Result<(), String> {
        if self.opts.read_only {
            return Err("the mount is read-only".into());
        }
        if self.recovery_running() {
            return Err("a recovery is already running; wait for it to finish".into());
        }
        let store = self.wrap_new(store);
        let listed = store.list("").map_err(|e| format!("{location}: {e}"))?;
        if !listed.is_empty() {
            return Err(format!("{location} is not empty"));
        }
        let old = self.backend(id).ok();
        if let Some(old) = &old {
            if old.is_optimal() && self.optimal_count() <= 1 {
                return Err(format!("member {id} is the last optimal backend"));
            }
        }
        match store.lock(crate::store::LockIntent::Write) {
            Ok(Some(guard)) => self.locks.lock().push(guard),
            Ok(None) => {}
            Err(e) => return Err(format!("{location}: {e}")),
        }
        let reason = format!(
            "replacing {}",
            old.as_ref().map_or("a missing member", |o| &o.location)
        );
        let new = Arc::new(Backend::new(
            id,
            location,
            store,
            BackendState::Degraded(reason),
        ));
        {
            let _switch = self.switch.write();
            let mut backends = self.backends.write();
            match backends.iter().position(|b| b.id == id) {
                Some(i) => backends[i] = new,
                None => backends.push(new),
            }
        }
        self.record_degradation(&[id], &[])
            .map_err(|e| e.to_string())?;
        self.start(id, true)
    }

    fn start(self: &Arc<Self>, id: u32, force_full: bool) -> Result<(), String> {
        if self.opts.read_only {
            return Err("the mount is read-only".into());
        }
        let backend = self.backend(id)?;
        match backend.state() {
            BackendState::Optimal => return Err(format!("member {id} is optimal already")),
            BackendState::Recovering(_) => {
                return Err(format!("member {id} is recovering already"))
            }
            BackendState::Degraded(_) => {}
        }
        if self.recovery_running.swap(true, Ordering::SeqCst) {
            return Err("a recovery is already running; wait for it to finish".into());
        }
        let full = force_full || !self.log_covers(&backend);
        let progress = Arc::new(Progress::new(full));
        {
            // No write is half done while the member starts receiving writes.
            let _switch = self.switch.write();
            *backend.state.lock() = BackendState::Recovering(Arc::clone(&progress));
        }
        {
            let mut sb = self.sb.lock();
            self.refresh_member_table(&mut sb);
            if let Err(e) = self.write_superblocks(&mut sb, |_| Vec::new()) {
                warn!("could not record the start of a recovery: {e}");
            }
        }
        let how = if full {
            "comparing every object"
        } else {
            "copying the logged keys"
        };
        info!(
            "recovery of member {id} ({}) started, {how}",
            backend.location
        );
        let mirror = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name(format!("recover-{id}"))
            .spawn(move || {
                let result = mirror.run_recovery(&backend, &progress);
                if let Err(e) = &result {
                    error!("recovery of member {id} ({}) failed: {e}", backend.location);
                    *backend.last_recovery.lock() = Some(summary(&progress, e));
                    mirror.fail_recovery(&backend, e);
                }
                mirror.recovery_running.store(false, Ordering::SeqCst);
            });
        spawned.map(|_| ()).map_err(|e| {
            self.recovery_running.store(false, Ordering::SeqCst);
            format!("cannot start the recovery thread: {e}")
        })
    }

    /// True when the member's missed-key log lists everything it missed.
    fn log_covers(&self, backend: &Backend) -> bool {
        let sb = self.superblock();
        let Some(m) = sb.members.iter().find(|m| m.id == backend.id) else {
            return false;
        };
        if m.missed_since == 0 {
            return false;
        }
        match read_superblock(&backend.location, backend.store.as_ref()) {
            Ok(own) => {
                own.fs_uuid == sb.fs_uuid
                    && own.member_id == backend.id
                    && own.generation.saturating_add(1) >= m.missed_since
            }
            Err(_) => false,
        }
    }

    fn fail_recovery(&self, backend: &Backend, why: &str) {
        {
            let mut state = backend.state.lock();
            if !matches!(*state, BackendState::Degraded(_)) {
                *state = BackendState::Degraded(format!("recovery failed: {why}"));
            }
        }
        let mut sb = self.sb.lock();
        self.refresh_member_table(&mut sb);
        Self::abandon_recovery(&mut sb, backend.id);
        if let Err(e) = self.write_superblocks(&mut sb, |_| Vec::new()) {
            error!("could not record the failed recovery: {e}");
        }
    }

    fn run_recovery(&self, x: &Arc<Backend>, progress: &Progress) -> Result<(), String> {
        let source = self
            .optimal()
            .into_iter()
            .next()
            .ok_or("no optimal backend to copy from")?;
        let mut offset = 0;
        if progress.full {
            self.copy_everything(&source, x, progress)?;
        } else {
            offset = self.copy_logged(&source, x, progress, 0, false)?;
        }
        self.finish(&source, x, progress, offset)
    }

    /// Copies the keys logged for `x` from `offset` on; returns where the log ended.
    fn copy_logged(
        &self,
        source: &Backend,
        x: &Backend,
        progress: &Progress,
        mut offset: usize,
        last_step: bool,
    ) -> Result<usize, String> {
        loop {
            let (keys, end) = self.read_log(source, x.id, offset)?;
            if keys.is_empty() {
                return Ok(end);
            }
            progress
                .objects_total
                .fetch_add(keys.len() as u64, Ordering::Relaxed);
            let bytes: u64 = keys.iter().filter_map(|k| source.store.size(k).ok()).sum();
            progress.bytes_total.fetch_add(bytes, Ordering::Relaxed);
            for key in &keys {
                self.copy_key(source, x, key, progress, false, last_step)?;
            }
            offset = end;
        }
    }

    /// Reads the complete lines of `id`'s log after `offset`.
    fn read_log(
        &self,
        source: &Backend,
        id: u32,
        offset: usize,
    ) -> Result<(BTreeSet<String>, usize), String> {
        let data = match source.store.get(&layout::missed_key(id)) {
            Ok(d) => d,
            Err(StoreError::NotFound) => return Ok((BTreeSet::new(), offset)),
            Err(e) => {
                return Err(format!(
                    "reading the missed-key log from {}: {e}",
                    source.location
                ))
            }
        };
        if data.len() <= offset {
            return Ok((BTreeSet::new(), offset));
        }
        let tail = &data[offset..];
        let end = match tail.iter().rposition(|&b| b == b'\n') {
            Some(i) => offset + i + 1,
            None => return Ok((BTreeSet::new(), offset)),
        };
        let keys = parse_log(&data[offset..end]);
        Ok((
            keys.into_iter().filter(|k| !is_private_key(k)).collect(),
            end,
        ))
    }

    fn copy_everything(
        &self,
        source: &Backend,
        x: &Backend,
        progress: &Progress,
    ) -> Result<(), String> {
        let own_log = layout::missed_key(x.id);
        let wanted = |k: &String| !is_private_key(k) && *k != own_log;
        let listed = source
            .store
            .list("")
            .map_err(|e| format!("listing {}: {e}", source.location))?;
        let mut keys: BTreeSet<String> = listed.into_iter().filter(wanted).collect();
        let theirs = x
            .store
            .list("")
            .map_err(|e| format!("listing {}: {e}", x.location))?;
        keys.extend(theirs.into_iter().filter(wanted));
        progress
            .objects_total
            .store(keys.len() as u64, Ordering::Relaxed);
        let bytes: u64 = keys.iter().filter_map(|k| source.store.size(k).ok()).sum();
        progress.bytes_total.store(bytes, Ordering::Relaxed);
        for key in &keys {
            self.copy_key(source, x, key, progress, true, false)?;
        }
        Ok(())
    }

    /// Makes `x`'s copy of `key` equal to the source's, under the key's stripe lock.
    /// `last_step` says the caller holds `switch` exclusively.
    fn copy_key(
        &self,
        source: &Backend,
        x: &Backend,
        key: &str,
        progress: &Progress,
        compare: bool,
        last_step: bool,
    ) -> Result<(), String> {
        if !x.is_recovering() {
            return Err(format!("interrupted: member {} is {:?}", x.id, x.state()));
        }
        let busy_before = self.foreground.load(Ordering::Relaxed);
        let started = Instant::now();
        let mut outcome = Ok(());
        let mut copy = || outcome = self.copy_one(source, x, key, progress, compare);
        // Under the lock that excludes writes to the key, so that the source's copy is
        // never read half-written (a checksum mismatch that is not damage). Not in the last
        // step, which holds `switch`: no write is in flight then, and a writer waiting for
        // `switch` may hold that lock.
        match self.key_locker.get() {
            Some(locker) if !last_step => locker(key, &mut copy),
            _ => copy(),
        }
        outcome?;
        let done = progress.objects_done.fetch_add(1, Ordering::Relaxed) + 1;
        progress.log_now(x.id, done);
        if self.foreground.load(Ordering::Relaxed) != busy_before {
            // The mount is busy: leave it at least half of the I/O.
            std::thread::sleep(started.elapsed());
        }
        Ok(())
    }

    fn copy_one(
        &self,
        source: &Backend,
        x: &Backend,
        key: &str,
        progress: &Progress,
        compare: bool,
    ) -> Result<(), String> {
        let _stripe = self.stripes[stripe_of(key)].lock();
        match self.source_copy(source, x, key) {
            Ok(data) => {
                let same = compare && x.store.get(key).is_ok_and(|old| old == data);
                if !same {
                    x.store
                        .put(key, &data)
                        .map_err(|e| format!("writing {key} to {}: {e}", x.location))?;
                }
                progress
                    .bytes_done
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            Err(StoreError::NotFound) => match x.store.delete(key) {
                Ok(()) | Err(StoreError::NotFound) => {}
                Err(e) => return Err(format!("deleting {key} on {}: {e}", x.location)),
            },
            Err(e) => return Err(format!("reading {key} from {}: {e}", source.location)),
        }
        Ok(())
    }

    /// The source's copy of `key`; when it fails its checksum, another optimal backend's
    /// (and the source's is repaired from it).
    fn source_copy(&self, source: &Backend, x: &Backend, key: &str) -> StoreResult<Vec<u8>> {
        match source.store.get(key) {
            Err(StoreError::Corrupt(why)) => {
                let others: Vec<Arc<Backend>> = self
                    .optimal()
                    .into_iter()
                    .filter(|b| b.id != x.id)
                    .collect();
                let source = others
                    .iter()
                    .find(|b| b.id == source.id)
                    .cloned()
                    .into_iter()
                    .collect::<Vec<_>>();
                self.heal(key, &source);
                others
                    .iter()
                    .find_map(|b| b.store.get(key).ok())
                    .ok_or(StoreError::Corrupt(why))
            }
            other => other,
        }
    }

    /// The short last step: see the module docs.
    fn finish(
        &self,
        source: &Backend,
        x: &Arc<Backend>,
        progress: &Progress,
        offset: usize,
    ) -> Result<(), String> {
        let _switch = self.switch.write();
        if !x.is_recovering() {
            return Err(format!("interrupted: member {} is {:?}", x.id, x.state()));
        }
        if !progress.full {
            self.copy_logged(source, x, progress, offset, true)?;
        }
        let others: Vec<u32> = self
            .logs
            .lock()
            .keys()
            .copied()
            .filter(|&id| id != x.id)
            .collect();
        for id in others {
            self.copy_key(source, x, &layout::missed_key(id), progress, false, true)?;
        }
        x.store
            .sync()
            .map_err(|e| format!("syncing {}: {e}", x.location))?;

        *x.last_recovery.lock() = Some(summary(progress, ""));
        *x.state.lock() = BackendState::Optimal;
        // Writes are paused (switch): start every member's journal afresh together.
        self.checkpoint_locked();
        let mut sb = self.sb.lock();
        sb.generation += 1;
        self.refresh_member_table(&mut sb);
        self.logs.lock().remove(&x.id);
        let log = layout::missed_key(x.id);
        self.write_superblocks(&mut sb, |_| vec![Mutation::Delete { key: log.clone() }])
            .map_err(|e| format!("recording the end of the recovery: {e}"))?;
        info!(
            "recovery of member {} ({}) complete: {} objects, {} bytes in {:.1}s",
            x.id,
            x.location,
            progress.objects_done.load(Ordering::Relaxed),
            progress.bytes_done.load(Ordering::Relaxed),
            progress.started.elapsed().as_secs_f64()
        );
        Ok(())
    }
}
