//! The mirror layer: owns the backends, their states, and the rules that keep them equal.
//!
//! # Writes: the broadcaster
//!
//! Every change is a [`Batch`] of object mutations, applied in order. [`Mirror::apply`] sends
//! the batch as one job to each *optimal* backend; each backend has its own small pool of
//! worker threads fed by its own queue, so a slow or hung backend only delays its own jobs.
//! The caller then waits on a barrier (one answer per backend, or the deadline):
//!
//! - a backend that answers with an error, or not before the deadline, is degraded with the
//!   reason, and the batch counts as done on the others;
//! - before the call returns, the degradation is recorded durably: the generation is bumped in
//!   the superblocks of the remaining optimal backends, so the degraded one can never come
//!   back as current (see [`Mirror::open`]);
//! - "not found" when deleting is an answer, not a failure;
//! - when every backend fails, nobody is degraded (the fault is most likely in the request,
//!   e.g. a full disk everywhere) and the caller gets the error;
//! - when fewer than `min_optimal` backends remain, writes are refused with
//!   [`MirrorError::NoQuorum`] (EROFS) and reads go on.
//!
//! A call to `apply` that returns `Ok` therefore means: every backend that is still optimal
//! has applied the whole batch (durably only after a [`Mutation::Sync`]).
//!
//! # What a degraded member missed
//!
//! While a member of the member table is not optimal (degraded, recovering, or absent), the
//! keys of every batch are appended to its missed-key log ([`layout::missed_key`]) on the
//! optimal backends, in the same job and *before* the batch's own mutations. The log is
//! therefore a superset of what the member missed, even across a crash. The member table
//! records since which generation the log is complete (`missed_since`); recovery copies only
//! the logged keys when the log covers the member's whole absence, and compares everything
//! otherwise (see [`recovery`]).
//!
//! # Reads
//!
//! Reads go to one optimal backend, chosen by a scrambled counter among those whose measured
//! latency is close to the best (so that load spreads over local disks, every copy is read
//! now and then, and a remote bucket is only read when it is as fast or a disk fails), with
//! the same deadline. An I/O error or a timeout
//! degrades that backend and the read is retried on the next one. "Not found" is returned
//! as an answer. A copy that fails its checksum is not a failure of the backend: the read
//! is answered from another copy, and the bad one is counted and rewritten from a good one
//! (see [`Mirror::heal`]); with no good copy left the read fails (EIO), and wrong bytes are
//! never returned.
//!
//! # Start-up
//!
//! [`Mirror::open`] reads every superblock: all must name the same filesystem; backends at the
//! highest generation start optimal, the others degraded ("stale"). A read-write mount refuses
//! to start when a member that the newest superblock records as optimal is missing, because
//! that member may hold newer writes (split-brain), unless told to run degraded. Each backend
//! is locked so that two mounts never share it. A read-write mount bumps the generation and
//! clears the clean flag; [`Mirror::close`] syncs every backend and sets it again.
//!
//! # Lock order
//!
//! `switch` (shared by broadcasts, exclusive for the last step of a recovery) before `sb`
//! before `logs`; backend state mutexes are leaves. `ino` is taken before `sb`.
//!
//! After an unclean stop, a read-write mount first brings the current backends back to one
//! state, from the crash journal or by comparing everything (see [`journal`]).
//!
//! Known shortcoming (failure handling): a backend that failed stays degraded until an
//! operator runs `recover`; nothing retries it automatically.

pub mod journal;
pub mod recovery;
pub mod scrub;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use parking_lot::{Mutex, RwLock};

use crate::layout::{self, MemberRecord, Superblock, SUPERBLOCK_KEY};
use crate::pool::{Answers, WorkerPool};
use crate::store::{
    BufferedStore, ChecksumStore, LockIntent, Store, StoreError, StoreResult, WriteBudget,
};

pub use recovery::Progress;
pub use scrub::{KeyLocker, ScrubProgress};

/// One object mutation.
#[derive(Clone, Debug)]
pub enum Mutation {
    /// Create or atomically replace an object.
    Put { key: String, data: Arc<[u8]> },
    /// Replace a small self-delimiting record (see [`Store::rewrite`]).
    Rewrite { key: String, data: Arc<[u8]> },
    /// Create an object that nothing refers to yet (see [`Store::create`]).
    Create { key: String, data: Arc<[u8]> },
    /// Write bytes at an offset of an object, creating it if needed.
    WriteAt {
        key: String,
        offset: u64,
        data: Arc<[u8]>,
    },
    /// Set the length of an object, creating it if needed.
    Truncate { key: String, len: u64 },
    /// Remove an object; a missing object is not an error.
    Delete { key: String },
    /// Remove data blocks `from..to` of file `ino`; missing blocks are not an error.
    TrimBlocks { ino: u64, from: u64, to: u64 },
    /// Durability barrier for everything before it on this backend.
    Sync,
    /// Send what a buffering backend holds in memory for keys starting with this prefix.
    Flush { prefix: String },
}

impl Mutation {
    fn apply(&self, store: &dyn Store) -> StoreResult<()> {
        match self {
            Mutation::Put { key, data } => store.put(key, data),
            Mutation::Create { key, data } => store.create(key, data),
            Mutation::Rewrite { key, data } => store.rewrite(key, data),
            Mutation::WriteAt { key, offset, data } => store.write_at(key, *offset, data),
            Mutation::Truncate { key, len } => store.truncate(key, *len),
            Mutation::Delete { key } => match store.delete(key) {
                Err(StoreError::NotFound) => Ok(()),
                other => other,
            },
            Mutation::TrimBlocks { ino, from, to } => {
                for index in *from..*to {
                    match store.delete(&layout::block_key(*ino, index)) {
                        Ok(()) | Err(StoreError::NotFound) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            }
            Mutation::Sync => store.sync(),
            Mutation::Flush { prefix } => store.flush(prefix),
        }
    }

    /// The keys this mutation may change.
    fn keys(&self, out: &mut Vec<String>) {
        match self {
            Mutation::Put { key, .. }
            | Mutation::Rewrite { key, .. }
            | Mutation::Create { key, .. }
            | Mutation::WriteAt { key, .. }
            | Mutation::Truncate { key, .. }
            | Mutation::Delete { key } => out.push(key.clone()),
            Mutation::TrimBlocks { ino, from, to } => {
                out.extend((*from..*to).map(|i| layout::block_key(*ino, i)))
            }
            Mutation::Sync | Mutation::Flush { .. } => {}
        }
    }
}

/// Mutations applied in order, as one job per backend.
pub type Batch = Vec<Mutation>;

fn batch_keys(batch: &Batch) -> Vec<String> {
    let mut keys = Vec::new();
    for m in batch {
        m.keys(&mut keys);
    }
    keys.sort();
    keys.dedup();
    keys
}

/// Why a mirror operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The object does not exist (an answer from an optimal backend).
    #[error("object not found")]
    NotFound,
    /// Fewer optimal backends than the quorum: writes are refused.
    #[error("fewer than {0} optimal backends: writes refused")]
    NoQuorum(usize),
    /// The mount is read-only.
    #[error("read-only mount")]
    ReadOnly,
    /// Every backend is full.
    #[error("no space left on any backend")]
    NoSpace,
    /// No optimal backend could serve the request.
    #[error("no backend could serve the request: {0}")]
    Failed(String),
    /// Every optimal backend's copy fails its checksum: no good copy exists.
    #[error("no good copy: {0}")]
    Corrupt(String),
}

/// The state of one backend.
#[derive(Clone, Debug)]
pub enum BackendState {
    Optimal,
    /// Not used for reads or writes; the reason is for humans.
    Degraded(String),
    /// Being resynchronised: receives every write, serves no reads.
    Recovering(Arc<Progress>),
}

impl PartialEq for BackendState {
    fn eq(&self, other: &BackendState) -> bool {
        match (self, other) {
            (BackendState::Optimal, BackendState::Optimal) => true,
            (BackendState::Degraded(a), BackendState::Degraded(b)) => a == b,
            (BackendState::Recovering(_), BackendState::Recovering(_)) => true,
            _ => false,
        }
    }
}

/// Counters shown by status.
#[derive(Default, Debug)]
pub struct Counters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub read_errors: AtomicU64,
    pub write_errors: AtomicU64,
    pub checksum_errors: AtomicU64,
}

/// One member of the mirror.
pub struct Backend {
    /// Member id from the superblock.
    pub id: u32,
    /// Where the backend is (canonical path or URL).
    pub location: String,
    pub store: Arc<dyn Store>,
    state: Mutex<BackendState>,
    pool: WorkerPool,
    pub counters: Counters,
    /// Moving average of read latency in microseconds (0 until measured).
    latency: AtomicU64,
    /// What the last recovery of this backend did, once finished.
    pub last_recovery: Mutex<Option<RecoverySummary>>,
}

/// The outcome of a finished recovery, shown by status.
#[derive(Clone, Debug)]
pub struct RecoverySummary {
    pub objects: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub full_compare: bool,
    /// Empty on success, otherwise why it failed.
    pub error: String,
}

impl Backend {
    fn new(id: u32, location: String, store: Arc<dyn Store>, state: BackendState) -> Backend {
        Backend {
            id,
            pool: WorkerPool::new(&format!("m{id}"), 8),
            location,
            store,
            state: Mutex::new(state),
            counters: Counters::default(),
            latency: AtomicU64::new(0),
            last_recovery: Mutex::new(None),
        }
    }

    /// Moving average of this backend's read latency, in microseconds (0: not measured).
    pub fn latency_us(&self) -> u64 {
        self.latency.load(Ordering::Relaxed)
    }

    fn note_latency(&self, took: Duration) {
        let sample = (took.as_micros() as u64).max(1);
        let old = self.latency.load(Ordering::Relaxed);
        let new = if old == 0 {
            sample
        } else {
            (old * 7 + sample) / 8
        };
        self.latency.store(new, Ordering::Relaxed);
    }

    /// The current state.
    pub fn state(&self) -> BackendState {
        self.state.lock().clone()
    }

    fn is_optimal(&self) -> bool {
        matches!(*self.state.lock(), BackendState::Optimal)
    }

    fn is_recovering(&self) -> bool {
        matches!(*self.state.lock(), BackendState::Recovering(_))
    }
}

/// Settings of a mirror.
#[derive(Clone, Debug)]
pub struct MirrorOptions {
    /// A backend that does not answer within this deadline is degraded.
    pub timeout: Duration,
    /// Writes are refused below this many optimal backends.
    pub min_optimal: usize,
    /// Never write anything, superblocks included.
    pub read_only: bool,
    /// Allow a read-write start although a member that may be current is missing.
    pub allow_missing: bool,
    /// Memory for partial data blocks held for backends that cannot write byte ranges
    /// (see [`crate::store::BufferedStore`]).
    pub write_buffer: usize,
}

impl Default for MirrorOptions {
    fn default() -> Self {
        MirrorOptions {
            timeout: Duration::from_secs(30),
            min_optimal: 1,
            read_only: false,
            allow_missing: false,
            write_buffer: 256 << 20,
        }
    }
}

/// Why a mirror could not be opened; each message is one line naming the problem.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OpenError(pub String);

/// Inode numbers reserved in the superblock and not handed out yet.
struct InoRange {
    next: u64,
    limit: u64,
}

/// How many inode numbers one superblock write reserves.
const INO_RESERVATION: u64 = 4096;

/// How often each optimal backend is checked (see [`Mirror::start_health_checks`]).
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(2);

/// Number of key stripes that serialise recovery copies with writes to a recovering member.
const STRIPES: usize = 1024;

/// A set of backends kept identical.
pub struct Mirror {
    backends: RwLock<Vec<Arc<Backend>>>,
    opts: MirrorOptions,
    /// Shared superblock content (its `member_id` is replaced per backend on write).
    /// Held while the member table or generation changes.
    sb: Mutex<Superblock>,
    ino: Mutex<InoRange>,
    /// Append offsets of the missed-key logs of the members that are not optimal.
    logs: Mutex<HashMap<u32, u64>>,
    /// Taken shared by every write; exclusively by the last step of a recovery.
    switch: RwLock<()>,
    /// Key stripes (see [`recovery`]).
    stripes: Vec<Mutex<()>>,
    /// Number of write batches so far; recovery throttles itself when it moves.
    foreground: AtomicU64,
    recovery_running: AtomicBool,
    next_read: AtomicUsize,
    locks: Mutex<Vec<Box<dyn Send + Sync>>>,
    /// Serialises a scrub's check of a key with writes to it (see [`scrub`]).
    key_locker: std::sync::OnceLock<Arc<KeyLocker>>,
    /// The running or last scrub.
    scrub: Mutex<Option<Arc<ScrubProgress>>>,
    /// Crash journal bookkeeping (see [`journal`]).
    journal: Mutex<journal::JournalState>,
    /// Memory shared by the write buffers of backends that cannot write byte ranges.
    budget: Arc<WriteBudget>,
}

impl Mirror {
    /// Opens the backends, checks their superblocks and decides their start-up states.
    pub fn open(
        stores: Vec<(String, Arc<dyn Store>)>,
        opts: MirrorOptions,
    ) -> Result<Mirror, OpenError> {
        if stores.is_empty() {
            return Err(OpenError("no backend given".into()));
        }
        let mut sbs = Vec::new();
        for (location, store) in &stores {
            sbs.push(read_superblock(location, store.as_ref())?);
        }
        check_same_filesystem(&stores, &sbs)?;
        // Only now that every backend is known to be right is anything touched.
        let mut locks = Vec::new();
        let intent = match opts.read_only {
            true => LockIntent::Read,
            false => LockIntent::Write,
        };
        for (location, store) in &stores {
            match store.lock(intent) {
                Ok(Some(guard)) => locks.push(guard),
                Ok(None) => {}
                Err(e) => return Err(OpenError(format!("{location}: {e}"))),
            }
        }

        let newest = sbs
            .iter()
            .max_by_key(|sb| sb.generation)
            .expect("non-empty")
            .clone();
        let present: HashMap<u32, usize> = sbs
            .iter()
            .enumerate()
            .map(|(i, sb)| (sb.member_id, i))
            .collect();
        if !opts.read_only && !opts.allow_missing {
            check_no_current_member_missing(&newest, &present)?;
        }

        let budget = WriteBudget::new(opts.write_buffer);
        let mut backends = Vec::new();
        for ((location, store), sb) in stores.into_iter().zip(&sbs) {
            let store = buffer_store(wrap_store(store, &newest), &newest, &budget);
            let state = start_state(sb, &newest);
            if let BackendState::Degraded(reason) = &state {
                warn!(
                    "backend {location} (member {}) starts degraded: {reason}",
                    sb.member_id
                );
            }
            backends.push(Arc::new(Backend::new(sb.member_id, location, store, state)));
        }

        let next_ino = newest.next_ino;
        let mirror = Mirror {
            backends: RwLock::new(backends),
            opts,
            sb: Mutex::new(newest),
            ino: Mutex::new(InoRange {
                next: next_ino,
                limit: next_ino,
            }),
            logs: Mutex::new(HashMap::new()),
            switch: RwLock::new(()),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            foreground: AtomicU64::new(0),
            recovery_running: AtomicBool::new(false),
            next_read: AtomicUsize::new(0),
            locks: Mutex::new(locks),
            key_locker: std::sync::OnceLock::new(),
            scrub: Mutex::new(None),
            journal: Mutex::new(journal::JournalState::new()),
            budget,
        };
        if mirror.optimal_count() == 0 {
            return Err(OpenError("no backend is current".into()));
        }
        let (clean, last_boot) = {
            let sb = mirror.sb.lock();
            (sb.clean, sb.boot_id.clone())
        };
        if !clean {
            if mirror.opts.read_only {
                warn!("the filesystem was not unmounted cleanly; a read-write mount repairs it");
            } else {
                let here = crate::host::boot_id();
                let same_boot = !here.is_empty() && last_boot == here;
                mirror
                    .repair_after_crash(same_boot)
                    .map_err(|e| OpenError(format!("repair after an unclean shutdown: {e}")))?;
            }
        }
        if !mirror.opts.read_only {
            mirror.start_writing()?;
        }
        Ok(mirror)
    }

    /// The backends, in the order given at open (a replaced one takes its predecessor's
    /// place).
    pub fn backends(&self) -> Vec<Arc<Backend>> {
        self.backends.read().clone()
    }

    /// The filesystem's block size.
    pub fn block_size(&self) -> u64 {
        self.sb.lock().block_size
    }

    /// True when the mirror never writes.
    pub fn read_only(&self) -> bool {
        self.opts.read_only
    }

    /// The settings the mirror was opened with.
    pub fn options(&self) -> &MirrorOptions {
        &self.opts
    }

    /// A copy of the shared superblock content (generation, member table).
    pub fn superblock(&self) -> Superblock {
        self.sb.lock().clone()
    }

    /// Number of backends currently optimal.
    pub fn optimal_count(&self) -> usize {
        self.backends
            .read()
            .iter()
            .filter(|b| b.is_optimal())
            .count()
    }

    fn optimal(&self) -> Vec<Arc<Backend>> {
        self.backends
            .read()
            .iter()
            .filter(|b| b.is_optimal())
            .cloned()
            .collect()
    }

    /// Marks the mount unclean and bumps the generation on every optimal backend, so that
    /// any member absent now is recognisably behind at the next start. Starts the
    /// missed-key log of every member that is not optimal and has none.
    fn start_writing(&self) -> Result<(), OpenError> {
        let mut sb = self.sb.lock();
        sb.clean = false;
        sb.boot_id = crate::host::boot_id();
        sb.generation += 1;
        // A crash repair may have raised `next_ino` since `ino` was set up.
        let first = sb.next_ino;
        sb.next_ino += INO_RESERVATION;
        let reserved = sb.next_ino;
        self.refresh_member_table(&mut sb);
        let generation = sb.generation;
        for m in sb.members.iter_mut().filter(|m| !m.degraded.is_empty()) {
            if m.missed_since == 0 {
                m.missed_since = generation;
            }
        }
        self.load_log_offsets(&sb);
        // A fresh journal: anything in an old one has been repaired by now.
        self.write_superblocks(&mut sb, |_| vec![delete_journal()])
            .map_err(|e| OpenError(format!("cannot write superblocks: {e}")))?;
        drop(sb);
        let mut ino = self.ino.lock();
        ino.next = ino.next.max(first);
        ino.limit = reserved;
        drop(ino);
        info!("mounted read-write");
        Ok(())
    }

    /// Finds where each existing missed-key log ends (on an optimal backend).
    fn load_log_offsets(&self, sb: &Superblock) {
        let mut logs = self.logs.lock();
        for m in sb.members.iter().filter(|m| !m.degraded.is_empty()) {
            let len = match self.get(&layout::missed_key(m.id)) {
                Ok(data) => data.len() as u64,
                Err(_) => 0,
            };
            logs.insert(m.id, len);
        }
    }

    /// Gives up the backends' locks (a bucket's lease is deleted). Called once the mount is
    /// gone and nothing writes any more; a process that dies without it loses its `flock`s
    /// with it, and its bucket leases become stale (`src/store/remote/lease.rs`).
    pub fn release_locks(&self) {
        let locks = std::mem::take(&mut *self.locks.lock());
        drop(locks);
    }

    /// Syncs every optimal backend and records a clean shutdown.
    pub fn close(&self) -> Result<(), MirrorError> {
        if self.opts.read_only {
            return Ok(());
        }
        self.apply(vec![Mutation::Sync])?;
        let mut sb = self.sb.lock();
        sb.clean = true;
        self.refresh_member_table(&mut sb);
        self.write_superblocks(&mut sb, |_| vec![delete_journal()])?;
        info!("all backends synced and marked clean");
        Ok(())
    }

    /// Hands out a new inode number, reserving more in the superblocks when needed.
    pub fn alloc_ino(&self) -> Result<u64, MirrorError> {
        let mut ino = self.ino.lock();
        if ino.next >= ino.limit {
            let mut sb = self.sb.lock();
            sb.next_ino = ino.limit + INO_RESERVATION;
            self.write_superblocks(&mut sb, |_| Vec::new())?;
            ino.limit = sb.next_ino;
        }
        let n = ino.next;
        ino.next += 1;
        Ok(n)
    }

    /// Copies the current states into the member table (caller holds the sb lock).
    fn refresh_member_table(&self, sb: &mut Superblock) {
        let backends = self.backends.read();
        for b in backends.iter() {
            // A degraded member keeps its "recovery under way" mark (a recovery interrupted by
            // an unmount resumes); only a failed or abandoned recovery clears it.
            let (degraded, recovering) = match b.state() {
                BackendState::Optimal => (String::new(), Some(false)),
                BackendState::Degraded(reason) => (reason, None),
                BackendState::Recovering(_) => ("recovering".to_string(), Some(true)),
            };
            match sb.members.iter_mut().find(|m| m.id == b.id) {
                Some(m) => {
                    m.location = b.location.clone();
                    m.degraded = degraded;
                    if let Some(recovering) = recovering {
                        m.recovering = recovering;
                    }
                    if m.degraded.is_empty() {
                        m.missed_since = 0;
                    }
                }
                None => sb.members.push(MemberRecord {
                    id: b.id,
                    location: b.location.clone(),
                    degraded,
                    missed_since: 0,
                    recovering: recovering.unwrap_or(false),
                }),
            }
        }
        for m in sb.members.iter_mut() {
            if !backends.iter().any(|b| b.id == m.id) && m.degraded.is_empty() {
                m.degraded = "missing at mount".into();
            }
        }
    }

    /// Writes `sb` (and `extra(member)` before it) to every optimal backend, each with its
    /// own member id, and syncs. A backend that fails is degraded and the write repeated
    /// with a new generation on the others. Caller holds the sb lock.
    fn write_superblocks(
        &self,
        sb: &mut Superblock,
        extra: impl Fn(u32) -> Vec<Mutation>,
    ) -> Result<(), MirrorError> {
        loop {
            let targets = self.optimal();
            if targets.is_empty() {
                return Err(MirrorError::Failed("no optimal backend".into()));
            }
            let results = self.run_jobs(&targets, |b| {
                let mut own = sb.clone();
                own.member_id = b.id;
                let mut batch = extra(b.id);
                batch.push(Mutation::Put {
                    key: SUPERBLOCK_KEY.into(),
                    data: own.encode().into(),
                });
                batch.push(Mutation::Sync);
                Arc::new(batch)
            });
            let failed = self.failures(&targets, &results);
            if failed.is_empty() {
                return Ok(());
            }
            if failed.len() == targets.len() {
                let why: Vec<String> = failed
                    .iter()
                    .map(|(b, r, _)| format!("{}: {r}", b.location))
                    .collect();
                error!("superblock write failed everywhere: {}", why.join("; "));
                return Err(MirrorError::Failed(why.join("; ")));
            }
            for (b, reason, _) in &failed {
                self.set_degraded(b, format!("superblock write failed: {reason}"));
            }
            self.note_degraded(sb, &failed.iter().map(|(b, _, _)| b.id).collect::<Vec<_>>());
        }
    }

    /// Clears the "recovery under way" mark of member `id` (caller holds sb).
    fn abandon_recovery(sb: &mut Superblock, id: u32) {
        if let Some(m) = sb.members.iter_mut().find(|m| m.id == id) {
            m.recovering = false;
        }
    }

    /// Bumps the generation and records since when `ids` miss writes (caller holds sb).
    fn note_degraded(&self, sb: &mut Superblock, ids: &[u32]) {
        sb.generation += 1;
        self.refresh_member_table(sb);
        let generation = sb.generation;
        for m in sb.members.iter_mut().filter(|m| ids.contains(&m.id)) {
            if m.missed_since == 0 {
                m.missed_since = generation;
            }
        }
    }

    /// Starts the thread that checks every [`HEALTH_INTERVAL`] that each optimal backend is
    /// still the store that was opened ([`Store::check`]) and degrades one that is not, so
    /// that writes never go on into, say, the empty mount point of a disk that went away.
    pub fn start_health_checks(self: &Arc<Self>) {
        if self.opts.read_only {
            return;
        }
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("health".into())
            .spawn(move || loop {
                std::thread::sleep(HEALTH_INTERVAL);
                let Some(mirror) = weak.upgrade() else { return };
                for b in mirror.optimal() {
                    if let Err(why) = b.store.check() {
                        if mirror.optimal_count() > 1 {
                            mirror.degrade_untrusted(&b, why);
                        } else {
                            error!("the last optimal backend failed its check: {why}");
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            error!("cannot start the health-check thread: {e}");
        }
    }

    /// Degrades a backend whose recent writes may have gone elsewhere: its missed-key log
    /// cannot be trusted, so its recovery will compare everything.
    fn degrade_untrusted(&self, backend: &Backend, why: String) {
        self.set_degraded(backend, why);
        if let Err(e) = self.record_degradation(&[backend.id], &[]) {
            error!("could not record the degraded backend: {e}");
        }
        let mut sb = self.sb.lock();
        if let Some(m) = sb.members.iter_mut().find(|m| m.id == backend.id) {
            m.missed_since = u64::MAX;
        }
        if let Err(e) = self.write_superblocks(&mut sb, |_| Vec::new()) {
            error!("could not record the degraded backend: {e}");
        }
    }

    /// Degrades a backend on the operator's request.
    pub fn disable(&self, id: u32) -> Result<(), String> {
        let _switch = self.switch.write();
        let backend = self.backend(id)?;
        match backend.state() {
            BackendState::Optimal => {}
            BackendState::Degraded(_) => return Err(format!("member {id} is already degraded")),
            BackendState::Recovering(_) => {
                Self::abandon_recovery(&mut self.sb.lock(), id);
                self.set_degraded(&backend, "disabled by operator".into());
                return self
                    .record_degradation(&[id], &[])
                    .map_err(|e| e.to_string());
            }
        }
        if self.optimal_count() <= 1 {
            return Err(format!("member {id} is the last optimal backend"));
        }
        Self::abandon_recovery(&mut self.sb.lock(), id);
        self.set_degraded(&backend, "disabled by operator".into());
        self.record_degradation(&[id], &[])
            .map_err(|e| e.to_string())
    }

    /// The backend with member id `id`.
    pub fn backend(&self, id: u32) -> Result<Arc<Backend>, String> {
        let backends = self.backends.read();
        let found = backends.iter().find(|b| b.id == id).cloned();
        found.ok_or_else(|| format!("no backend with member id {id} in this mount"))
    }

    /// Applies `batch` on every optimal backend; see the module docs for the rules.
    pub fn apply(&self, batch: Batch) -> Result<(), MirrorError> {
        if self.opts.read_only {
            return Err(MirrorError::ReadOnly);
        }
        if self.optimal_count() < self.opts.min_optimal {
            return Err(MirrorError::NoQuorum(self.opts.min_optimal));
        }
        self.maybe_checkpoint();
        let _switch = self.switch.read();
        self.foreground.fetch_add(1, Ordering::Relaxed);
        let lines = self.journal_lines(&batch);
        let batch = Arc::new(batch);
        // The keys are only needed while some member is not optimal; most writes never
        // compute them.
        let keys = std::cell::OnceCell::new();
        let keys = || keys.get_or_init(|| batch_keys(&batch)).as_slice();

        // Targets first, logs second: a member degraded in between already has its log
        // (see `set_degraded`), so this batch is either sent to it or logged for it.
        let targets = self.optimal();
        if targets.is_empty() {
            return Err(MirrorError::Failed("no optimal backend".into()));
        }
        let logged = self.log_appends(keys);
        let full = if logged.is_empty() {
            Arc::clone(&batch)
        } else {
            let mut full = logged;
            full.extend(batch.iter().cloned());
            Arc::new(full)
        };
        // Backends that keep a journal get the batch between its entry and its ok line.
        let journaled = lines.map(|lines| {
            let mut with = Vec::with_capacity(full.len() + 2);
            with.push(lines.before);
            with.extend(full.iter().cloned());
            with.push(lines.after);
            Arc::new(with)
        });
        let results = self.run_jobs(&targets, |b| match &journaled {
            Some(with) if b.store.ranged_writes() => Arc::clone(with),
            _ => Arc::clone(&full),
        });
        let failed = self.failures(&targets, &results);
        if !failed.is_empty() {
            if failed.len() == targets.len() {
                if failed.iter().all(|f| f.2) {
                    return Err(MirrorError::NoSpace);
                }
                let why: Vec<String> = failed
                    .iter()
                    .map(|(b, r, _)| format!("{}: {r}", b.location))
                    .collect();
                error!("write failed on every backend: {}", why.join("; "));
                return Err(MirrorError::Failed(why.join("; ")));
            }
            for (backend, reason, _) in &failed {
                backend
                    .counters
                    .write_errors
                    .fetch_add(1, Ordering::Relaxed);
                self.set_degraded(backend, format!("write failed: {reason}"));
            }
            let ids: Vec<u32> = failed.iter().map(|(b, _, _)| b.id).collect();
            if let Err(e) = self.record_degradation(&ids, keys()) {
                error!("could not record the degraded backend(s): {e}");
            }
        }
        self.apply_to_recovering(&batch, keys);
        if self.optimal_count() < self.opts.min_optimal {
            return Err(MirrorError::NoQuorum(self.opts.min_optimal));
        }
        Ok(())
    }

    /// Second phase of a write while a member recovers: the batch reaches it only after
    /// every optimal backend has it, under the stripe locks of its keys (see [`recovery`]).
    fn apply_to_recovering<'k>(&self, batch: &Arc<Batch>, keys: impl FnOnce() -> &'k [String]) {
        let recovering: Vec<Arc<Backend>> = self
            .backends
            .read()
            .iter()
            .filter(|b| b.is_recovering())
            .cloned()
            .collect();
        if recovering.is_empty() {
            return;
        }
        let mut stripes: Vec<usize> = keys().iter().map(|k| stripe_of(k)).collect();
        stripes.sort_unstable();
        stripes.dedup();
        let guards: Vec<_> = stripes.iter().map(|&i| self.stripes[i].lock()).collect();
        let results = self.run_jobs(&recovering, |_| Arc::clone(batch));
        drop(guards);
        for (backend, reason, _) in self.failures(&recovering, &results) {
            self.set_degraded(&backend, format!("recovery failed: write error: {reason}"));
        }
    }

    /// Mutations appending `keys` to the missed-key log of every member not optimal.
    fn log_appends<'k>(&self, keys: impl FnOnce() -> &'k [String]) -> Vec<Mutation> {
        let mut logs = self.logs.lock();
        if logs.is_empty() {
            return Vec::new();
        }
        let keys = keys();
        if keys.is_empty() {
            return Vec::new();
        }
        let mut text = keys.join("\n");
        text.push('\n');
        let data: Arc<[u8]> = text.into_bytes().into();
        let mut out = Vec::new();
        for (id, offset) in logs.iter_mut() {
            out.push(Mutation::WriteAt {
                key: layout::missed_key(*id),
                offset: *offset,
                data: Arc::clone(&data),
            });
            *offset += data.len() as u64;
        }
        out
    }

    /// Records durably that `ids` are degraded: bumps the generation on the remaining optimal
    /// backends and appends `keys` (the batch they may have missed as they failed) to the
    /// members' missed-key logs.
    fn record_degradation(&self, ids: &[u32], keys: &[String]) -> Result<(), MirrorError> {
        let mut sb = self.sb.lock();
        self.note_degraded(&mut sb, ids);
        let mut appends = HashMap::new();
        if !keys.is_empty() {
            let mut text = keys.join("\n");
            text.push('\n');
            let mut logs = self.logs.lock();
            for id in ids {
                let offset = logs.entry(*id).or_insert(0);
                appends.insert(*id, (*offset, text.clone()));
                *offset += text.len() as u64;
            }
        }
        let result = self.write_superblocks(&mut sb, |_| {
            let appended = appends
                .iter()
                .map(|(id, (offset, text))| Mutation::WriteAt {
                    key: layout::missed_key(*id),
                    offset: *offset,
                    data: text.as_bytes().into(),
                });
            appended.collect()
        });
        let optimal = self.optimal_count();
        if optimal < self.opts.min_optimal {
            error!(
                "only {optimal} optimal backend(s), quorum is {}: refusing writes",
                self.opts.min_optimal
            );
        }
        result
    }

    /// Runs one job per target and waits for all of them until the deadline.
    fn run_jobs(
        &self,
        targets: &[Arc<Backend>],
        make: impl Fn(&Backend) -> Arc<Batch>,
    ) -> Vec<Option<StoreResult<()>>> {
        let answers = Answers::new(targets.len());
        for (slot, backend) in targets.iter().enumerate() {
            let batch = make(backend);
            let answers = Arc::clone(&answers);
            let b = Arc::clone(backend);
            backend
                .pool
                .submit(Box::new(move || answers.put(slot, run_batch(&b, &batch))));
        }
        answers.wait(Instant::now() + self.opts.timeout)
    }

    /// The targets whose job failed or timed out: (backend, reason, was it "no space").
    fn failures(
        &self,
        targets: &[Arc<Backend>],
        results: &[Option<StoreResult<()>>],
    ) -> Vec<(Arc<Backend>, String, bool)> {
        let mut failed = Vec::new();
        for (backend, result) in targets.iter().zip(results) {
            match result {
                Some(Ok(())) => {}
                Some(Err(e)) => failed.push((Arc::clone(backend), e.to_string(), is_no_space(e))),
                None => failed.push((Arc::clone(backend), self.timeout_reason(), false)),
            }
        }
        failed
    }

    fn timeout_reason(&self) -> String {
        format!("no answer within {:?}", self.opts.timeout)
    }

    /// Marks a backend degraded. Its missed-key log is started *before* the state changes, so
    /// a write that no longer sends to it always logs for it (see `apply`).
    fn set_degraded(&self, backend: &Backend, reason: String) {
        self.logs.lock().entry(backend.id).or_insert(0);
        let mut state = backend.state.lock();
        if !matches!(*state, BackendState::Degraded(_)) {
            warn!(
                "backend {} (member {}) degraded: {reason}",
                backend.location, backend.id
            );
            *state = BackendState::Degraded(reason);
        }
    }

    /// Reads from one optimal backend, failing over to the others on error or timeout.
    pub fn read<T, F>(&self, f: F) -> Result<T, MirrorError>
    where
        T: Send + 'static,
        F: Fn(&dyn Store) -> StoreResult<T> + Send + Sync + 'static,
    {
        self.read_from(f).0
    }

    /// [`Mirror::read`], also returning the backends whose copy failed its checksum (the
    /// read was answered by another one). With none left, the error is
    /// [`MirrorError::Corrupt`].
    fn read_from<T, F>(&self, f: F) -> (Result<T, MirrorError>, Vec<Arc<Backend>>)
    where
        T: Send + 'static,
        F: Fn(&dyn Store) -> StoreResult<T> + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        let backends = self.read_order();
        let mut last_error = String::from("no optimal backend");
        let mut suspects = Vec::new();
        for backend in &backends {
            if !backend.is_optimal() {
                continue;
            }
            let reason = match self.read_one(backend, Arc::clone(&f)) {
                Some(Ok(v)) => return (Ok(v), suspects),
                Some(Err(StoreError::NotFound)) => return (Err(MirrorError::NotFound), suspects),
                Some(Err(StoreError::Corrupt(why))) => {
                    // Not a failure of the backend: another copy answers, and the caller
                    // decides whether to repair this one.
                    last_error = format!("{}: {why}", backend.location);
                    suspects.push(Arc::clone(backend));
                    continue;
                }
                Some(Err(e)) => {
                    backend.counters.read_errors.fetch_add(1, Ordering::Relaxed);
                    format!("read failed: {e}")
                }
                None => self.timeout_reason(),
            };
            last_error = format!("{}: {reason}", backend.location);
            if self.optimal_count() > 1 {
                self.set_degraded(backend, reason);
                if !self.opts.read_only {
                    let _ = self.record_degradation(&[backend.id], &[]);
                }
            }
        }
        if !suspects.is_empty() {
            return (Err(MirrorError::Corrupt(last_error)), suspects);
        }
        (Err(MirrorError::Failed(last_error)), suspects)
    }

    /// The backends in the order a read tries them. The first is picked among the fast ones
    /// (measured read latency at most twice the best, plus 1 ms): in a mirror of local disks
    /// that is any of them, in a mirror of a local disk and a remote bucket the disk. The
    /// pick uses a scrambled counter rather than plain round-robin: a reader whose requests
    /// come in a fixed pattern would otherwise always read a given object from the same
    /// backend, and the other copies would never be verified by reads. The others follow,
    /// fastest first, for failover.
    fn read_order(&self) -> Vec<Arc<Backend>> {
        let mut backends: Vec<Arc<Backend>> = self
            .backends()
            .into_iter()
            .filter(|b| b.is_optimal())
            .collect();
        if backends.is_empty() {
            return backends;
        }
        let best = backends.iter().map(|b| b.latency_us()).min().unwrap_or(0);
        let near: Vec<usize> = (0..backends.len())
            .filter(|&i| backends[i].latency_us() <= best * 2 + 1000)
            .collect();
        let pick = spread(self.next_read.fetch_add(1, Ordering::Relaxed));
        let first = near[pick % near.len()];
        let chosen = backends.swap_remove(first);
        backends.sort_by_key(|b| b.latency_us());
        backends.insert(0, chosen);
        backends
    }

    fn read_one<T, F>(&self, backend: &Arc<Backend>, f: Arc<F>) -> Option<StoreResult<T>>
    where
        T: Send + 'static,
        F: Fn(&dyn Store) -> StoreResult<T> + Send + Sync + 'static,
    {
        let answer = Answers::new(1);
        let b = Arc::clone(backend);
        let a = Arc::clone(&answer);
        backend.pool.submit(Box::new(move || {
            b.counters.reads.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            let result = f(b.store.as_ref());
            b.note_latency(started.elapsed());
            a.put(0, result);
        }));
        answer
            .wait(Instant::now() + self.opts.timeout)
            .pop()
            .flatten()
    }

    /// Reads a whole object, repairing copies that fail their checksum on the way.
    ///
    /// Only for objects no write can be changing at the same time (records being loaded,
    /// or any object while the caller holds the lock that serialises its writes).
    pub fn get(&self, key: &str) -> Result<Vec<u8>, MirrorError> {
        let owned = key.to_string();
        let (result, suspects) = self.read_from(move |s| s.get(&owned));
        if !suspects.is_empty() {
            self.heal(key, &suspects);
        }
        result
    }

    /// Reads a whole object from any backend with a good copy, repairing nothing (for
    /// callers that repair, and count, themselves).
    pub fn get_unhealed(&self, key: &str) -> Result<Vec<u8>, MirrorError> {
        let owned = key.to_string();
        self.read_from(move |s| s.get(&owned)).0
    }

    /// Reads a byte range of an object (short at its end), without taking any lock.
    ///
    /// A write to the same object may run at the same time, and a read that overlaps it
    /// can see new data with an old checksum. So a mismatch is not trusted here: the second
    /// value says some copy failed its checksum, and the caller is expected to read again
    /// with [`Mirror::get_range_healing`] under the lock that excludes writes. The bytes
    /// returned are always ones that matched their checksum.
    pub fn get_range_checked(
        &self,
        key: &str,
        offset: u64,
        len: usize,
    ) -> Result<(Vec<u8>, bool), MirrorError> {
        let owned = key.to_string();
        let (result, suspects) = self.read_from(move |s| s.get_range(&owned, offset, len));
        match result {
            Ok(bytes) => Ok((bytes, !suspects.is_empty())),
            Err(e) => Err(e),
        }
    }

    /// Reads a byte range of an object; copies that fail their checksum are counted and
    /// repaired from a good one. The caller must hold the lock that excludes writes to
    /// `key`. Fails with [`MirrorError::Corrupt`] when no copy is good.
    pub fn get_range_healing(
        &self,
        key: &str,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, MirrorError> {
        let owned = key.to_string();
        let (result, suspects) = self.read_from(move |s| s.get_range(&owned, offset, len));
        if !suspects.is_empty() {
            self.heal(key, &suspects);
        }
        result
    }

    /// Re-checks `key` on each suspect backend and, where its copy really is bad, counts a
    /// checksum error and rewrites it from a good copy on another optimal backend. Returns
    /// the number of copies that were bad and could not be repaired. No write to `key`
    /// may run meanwhile.
    pub fn heal(&self, key: &str, suspects: &[Arc<Backend>]) -> usize {
        let mut bad = Vec::new();
        for b in suspects {
            match b.store.get(key) {
                Err(StoreError::Corrupt(why)) => {
                    b.counters.checksum_errors.fetch_add(1, Ordering::Relaxed);
                    warn!("backend {} (member {}): {why}", b.location, b.id);
                    bad.push(Arc::clone(b));
                }
                // A read that overlapped a write, or a copy already repaired.
                _ => continue,
            }
        }
        if bad.is_empty() {
            return 0;
        }
        let good = self
            .optimal()
            .into_iter()
            .filter(|o| !bad.iter().any(|b| b.id == o.id))
            .find_map(|o| o.store.get(key).ok().map(|data| (o, data)));
        let Some((source, data)) = good else {
            error!("{key}: no backend holds a good copy; reads of it fail with EIO");
            return bad.len();
        };
        if self.opts.read_only {
            warn!("{key}: read-only mount, bad copies left as they are");
            return bad.len();
        }
        let mut unrepaired = 0;
        for b in bad {
            match b.store.put(key, &data) {
                Ok(()) => info!("repaired {key} on {} from {}", b.location, source.location),
                Err(e) => {
                    unrepaired += 1;
                    b.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                    self.set_degraded(&b, format!("repair of {key} failed: {e}"));
                    let _ = self.record_degradation(&[b.id], &[key.to_string()]);
                }
            }
        }
        unrepaired
    }

    /// Lists keys under a prefix.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>, MirrorError> {
        let prefix = prefix.to_string();
        self.read(move |s| s.list(&prefix))
    }

    /// True when some optimal backend holds data of keys starting with `prefix` in memory
    /// (a buffering backend: see [`BufferedStore`]); a [`Mutation::Flush`] sends it.
    pub fn has_pending(&self, prefix: &str) -> bool {
        self.backends
            .read()
            .iter()
            .any(|b| b.store.has_pending(prefix))
    }

    /// The store as used for a backend added while mounted (see [`recovery`]).
    fn wrap_new(&self, store: Arc<dyn Store>) -> Arc<dyn Store> {
        let sb = self.superblock();
        buffer_store(wrap_store(store, &sb), &sb, &self.budget)
    }

    /// Total and free bytes: the smallest free space of the optimal backends.
    pub fn space(&self) -> Option<(u64, u64)> {
        let optimal = self.optimal();
        optimal
            .iter()
            .filter_map(|b| b.store.space())
            .min_by_key(|(_, free)| *free)
    }
}

/// SplitMix64's finaliser: consecutive counters map to well-spread values.
fn spread(n: usize) -> usize {
    let mut z = (n as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as usize
}

fn stripe_of(key: &str) -> usize {
    let hash = blake3::hash(key.as_bytes());
    let bytes = hash.as_bytes();
    (u16::from_le_bytes([bytes[0], bytes[1]]) as usize) % STRIPES
}

/// Formats empty stores as the members of one new mirror: writes `contents` (the objects
/// of an empty filesystem) and then a superblock to each, and syncs. Returns the new
/// filesystem's uuid. Member ids follow the order of `stores`.
pub fn format(stores: &[(String, Arc<dyn Store>)], contents: &Batch) -> StoreResult<String> {
    format_with(stores, contents, true)
}

/// [`format`], choosing whether objects carry checksums (benchmarks compare both).
pub fn format_with(
    stores: &[(String, Arc<dyn Store>)],
    contents: &Batch,
    checksums: bool,
) -> StoreResult<String> {
    let members: Vec<MemberRecord> = stores
        .iter()
        .enumerate()
        .map(|(i, (location, _))| MemberRecord {
            id: i as u32,
            location: location.clone(),
            degraded: String::new(),
            missed_since: 0,
            recovering: false,
        })
        .collect();
    let sb = Superblock {
        magic: layout::MAGIC.into(),
        format_version: layout::FORMAT_VERSION,
        fs_uuid: uuid::Uuid::new_v4().to_string(),
        member_id: 0,
        generation: 1,
        members,
        clean: true,
        next_ino: layout::ROOT_INO + 1,
        block_size: layout::DEFAULT_BLOCK_SIZE,
        checksums,
        boot_id: String::new(),
    };
    for (i, (_, store)) in stores.iter().enumerate() {
        let wrapped = wrap_store(Arc::clone(store), &sb);
        for m in contents {
            m.apply(wrapped.as_ref())?;
        }
        let mut own = sb.clone();
        own.member_id = i as u32;
        store.put(SUPERBLOCK_KEY, &own.encode())?;
        store.sync()?;
    }
    Ok(sb.fs_uuid)
}

/// The store as the mirror uses it: wrapped in a [`ChecksumStore`] when the filesystem has
/// checksums.
pub fn wrap_store(store: Arc<dyn Store>, sb: &Superblock) -> Arc<dyn Store> {
    if sb.checksums {
        Arc::new(ChecksumStore::new(store, sb.block_size))
    } else {
        store
    }
}

/// A backend that cannot write byte ranges gets a write buffer (see [`BufferedStore`]).
fn buffer_store(
    store: Arc<dyn Store>,
    sb: &Superblock,
    budget: &Arc<WriteBudget>,
) -> Arc<dyn Store> {
    if store.ranged_writes() {
        store
    } else {
        Arc::new(BufferedStore::new(store, sb.block_size, Arc::clone(budget)))
    }
}

fn run_batch(backend: &Backend, batch: &Batch) -> StoreResult<()> {
    for m in batch.iter() {
        m.apply(backend.store.as_ref())?;
        backend.counters.writes.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

fn is_no_space(e: &StoreError) -> bool {
    match e {
        StoreError::NoSpace => true,
        StoreError::Io(io) => io.raw_os_error() == Some(libc::ENOSPC),
        _ => false,
    }
}

fn read_superblock(location: &str, store: &dyn Store) -> Result<Superblock, OpenError> {
    match store.get(SUPERBLOCK_KEY) {
        Ok(data) => Superblock::decode(&data).map_err(|e| OpenError(format!("{location}: {e}"))),
        Err(StoreError::NotFound) => Err(OpenError(format!(
            "{location}: not a mirrorfs backend (no superblock; format it with mirrorfs init)"
        ))),
        Err(e) => Err(OpenError(format!(
            "{location}: cannot read superblock: {e}"
        ))),
    }
}

fn check_same_filesystem(
    stores: &[(String, Arc<dyn Store>)],
    sbs: &[Superblock],
) -> Result<(), OpenError> {
    let first = &sbs[0];
    for (i, sb) in sbs.iter().enumerate().skip(1) {
        if sb.fs_uuid != first.fs_uuid {
            return Err(OpenError(format!(
                "backends belong to different filesystems: {} is {}, {} is {}",
                stores[0].0, first.fs_uuid, stores[i].0, sb.fs_uuid
            )));
        }
        if let Some(j) = sbs[..i].iter().position(|o| o.member_id == sb.member_id) {
            return Err(OpenError(format!(
                "{} and {} are the same member ({}) of the mirror",
                stores[j].0, stores[i].0, sb.member_id
            )));
        }
    }
    Ok(())
}

fn check_no_current_member_missing(
    newest: &Superblock,
    present: &HashMap<u32, usize>,
) -> Result<(), OpenError> {
    for m in &newest.members {
        if m.degraded.is_empty() && !present.contains_key(&m.id) {
            return Err(OpenError(format!(
                "member {} ({}) is missing and may hold newer data; give every backend, \
                 or mount with -o degraded to go on without it",
                m.id, m.location
            )));
        }
    }
    Ok(())
}

fn start_state(sb: &Superblock, newest: &Superblock) -> BackendState {
    if sb.generation < newest.generation {
        return BackendState::Degraded(format!(
            "stale: generation {} behind {}",
            sb.generation, newest.generation
        ));
    }
    match newest.members.iter().find(|m| m.id == sb.member_id) {
        Some(m) if !m.degraded.is_empty() => BackendState::Degraded(m.degraded.clone()),
        _ => BackendState::Optimal,
    }
}

/// Keys that only the mirror itself manages and that recovery never copies as data.
fn is_private_key(key: &str) -> bool {
    key == SUPERBLOCK_KEY || key == layout::JOURNAL_KEY
}

fn delete_journal() -> Mutation {
    Mutation::Delete {
        key: layout::JOURNAL_KEY.into(),
    }
}

/// Parses a missed-key log: one key per line; empty lines (or zero bytes left by a crash
/// between two appends) are skipped.
fn parse_log(data: &[u8]) -> BTreeSet<String> {
    data.split(|&b| b == b'\n' || b == 0)
        .filter(|line| !line.is_empty())
        .filter_map(|line| std::str::from_utf8(line).ok().map(str::to_owned))
        .collect()
}

#[cfg(test)]
mod tests;
