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
//! # Reads
//!
//! Reads go to one optimal backend, chosen round-robin so that load spreads, with the same
//! deadline. An I/O error or a timeout degrades that backend and the read is retried on the
//! next one. "Not found" is returned as an answer.
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
//! Known shortcomings (failure handling): a degraded backend stays degraded until the next
//! mount; online recovery and the record of missed keys are not implemented yet.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{error, info, warn};
use parking_lot::Mutex;

use crate::layout::{self, MemberRecord, Superblock, SUPERBLOCK_KEY};
use crate::pool::{Answers, WorkerPool};
use crate::store::{Store, StoreError, StoreResult};

/// One object mutation.
#[derive(Debug)]
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
        }
    }

    fn bytes(&self) -> u64 {
        match self {
            Mutation::Put { data, .. }
            | Mutation::Create { data, .. }
            | Mutation::Rewrite { data, .. }
            | Mutation::WriteAt { data, .. } => data.len() as u64,
            _ => 0,
        }
    }
}

/// Mutations applied in order, as one job per backend.
pub type Batch = Vec<Mutation>;

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
}

/// The state of one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendState {
    Optimal,
    /// Not used for reads or writes; the reason is for humans.
    Degraded(String),
}

/// Counters shown by status.
#[derive(Default, Debug)]
pub struct Counters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub read_errors: AtomicU64,
    pub write_errors: AtomicU64,
}

/// One member of the mirror.
pub struct Backend {
    /// Member id from the superblock.
    pub id: u32,
    /// Path or URL as given by the user.
    pub location: String,
    pub store: Arc<dyn Store>,
    state: Mutex<BackendState>,
    pool: WorkerPool,
    pub counters: Counters,
}

impl Backend {
    /// The current state.
    pub fn state(&self) -> BackendState {
        self.state.lock().clone()
    }

    fn is_optimal(&self) -> bool {
        *self.state.lock() == BackendState::Optimal
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
    /// Worker threads per backend.
    pub workers_per_backend: usize,
}

impl Default for MirrorOptions {
    fn default() -> Self {
        MirrorOptions {
            timeout: Duration::from_secs(30),
            min_optimal: 1,
            read_only: false,
            allow_missing: false,
            workers_per_backend: 8,
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

/// A set of backends kept identical.
pub struct Mirror {
    backends: Vec<Arc<Backend>>,
    opts: MirrorOptions,
    /// Shared superblock content (its `member_id` is replaced per backend on write).
    /// Held while the member table or generation changes.
    sb: Mutex<Superblock>,
    ino: Mutex<InoRange>,
    next_read: AtomicUsize,
    _locks: Vec<Box<dyn Send + Sync>>,
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
        let mut locks = Vec::new();
        let mut sbs = Vec::new();
        for (location, store) in &stores {
            let sb = read_superblock(location, store.as_ref())?;
            match store.lock() {
                Ok(Some(guard)) => locks.push(guard),
                Ok(None) => {}
                Err(e) => return Err(OpenError(format!("{location}: {e}"))),
            }
            sbs.push(sb);
        }
        check_same_filesystem(&stores, &sbs)?;

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

        let mut backends = Vec::new();
        for ((location, store), sb) in stores.into_iter().zip(&sbs) {
            let state = start_state(sb, &newest);
            if let BackendState::Degraded(reason) = &state {
                warn!(
                    "backend {location} (member {}) starts degraded: {reason}",
                    sb.member_id
                );
            }
            backends.push(Arc::new(Backend {
                id: sb.member_id,
                pool: WorkerPool::new(&format!("m{}", sb.member_id), opts.workers_per_backend),
                location,
                store,
                state: Mutex::new(state),
                counters: Counters::default(),
            }));
        }

        let next_ino = newest.next_ino;
        let mirror = Mirror {
            backends,
            opts,
            sb: Mutex::new(newest),
            ino: Mutex::new(InoRange {
                next: next_ino,
                limit: next_ino,
            }),
            next_read: AtomicUsize::new(0),
            _locks: locks,
        };
        if mirror.optimal_count() == 0 {
            return Err(OpenError("no backend is current".into()));
        }
        if !mirror.opts.read_only {
            mirror.start_writing()?;
        }
        Ok(mirror)
    }

    /// The backends, in the order given at open.
    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// The filesystem's block size.
    pub fn block_size(&self) -> u64 {
        self.sb.lock().block_size
    }

    /// True when the mirror never writes.
    pub fn read_only(&self) -> bool {
        self.opts.read_only
    }

    /// The filesystem uuid.
    pub fn fs_uuid(&self) -> String {
        self.sb.lock().fs_uuid.clone()
    }

    /// Number of backends currently optimal.
    pub fn optimal_count(&self) -> usize {
        self.backends.iter().filter(|b| b.is_optimal()).count()
    }

    /// Marks the mount unclean and bumps the generation on every optimal backend, so that
    /// any member absent now is recognisably behind at the next start.
    fn start_writing(&self) -> Result<(), OpenError> {
        let mut sb = self.sb.lock();
        sb.clean = false;
        sb.generation += 1;
        sb.next_ino += INO_RESERVATION;
        let reserved = sb.next_ino;
        self.refresh_member_table(&mut sb);
        self.write_superblocks(&sb)
            .map_err(|e| OpenError(format!("cannot write superblocks: {e}")))?;
        drop(sb);
        let mut ino = self.ino.lock();
        ino.limit = reserved;
        info!("mounted read-write");
        Ok(())
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
        self.write_superblocks(&sb)?;
        info!("all backends synced and marked clean");
        Ok(())
    }

    /// Hands out a new inode number, reserving more in the superblocks when needed.
    pub fn alloc_ino(&self) -> Result<u64, MirrorError> {
        let mut ino = self.ino.lock();
        if ino.next >= ino.limit {
            let mut sb = self.sb.lock();
            sb.next_ino = ino.limit + INO_RESERVATION;
            self.write_superblocks(&sb)?;
            ino.limit = sb.next_ino;
        }
        let n = ino.next;
        ino.next += 1;
        Ok(n)
    }

    /// Copies the current states into the member table (caller holds the sb lock).
    fn refresh_member_table(&self, sb: &mut Superblock) {
        for b in &self.backends {
            let degraded = match b.state() {
                BackendState::Optimal => String::new(),
                BackendState::Degraded(reason) => reason,
            };
            let record = MemberRecord {
                id: b.id,
                location: b.location.clone(),
                degraded,
            };
            match sb.members.iter_mut().find(|m| m.id == b.id) {
                Some(m) => *m = record,
                None => sb.members.push(record),
            }
        }
        let present: Vec<u32> = self.backends.iter().map(|b| b.id).collect();
        for m in sb.members.iter_mut() {
            if !present.contains(&m.id) && m.degraded.is_empty() {
                m.degraded = "missing at mount".into();
            }
        }
    }

    /// Writes `sb` to every optimal backend, each with its own member id, and syncs it.
    fn write_superblocks(&self, sb: &Superblock) -> Result<(), MirrorError> {
        self.broadcast(|b| {
            let mut own = sb.clone();
            own.member_id = b.id;
            Arc::new(vec![
                Mutation::Put {
                    key: SUPERBLOCK_KEY.into(),
                    data: own.encode().into(),
                },
                Mutation::Sync,
            ])
        })
    }

    /// Applies `batch` on every optimal backend; see the module docs for the rules.
    pub fn apply(&self, batch: Batch) -> Result<(), MirrorError> {
        if self.opts.read_only {
            return Err(MirrorError::ReadOnly);
        }
        let optimal = self.optimal_count();
        if optimal < self.opts.min_optimal {
            return Err(MirrorError::NoQuorum(self.opts.min_optimal));
        }
        let batch = Arc::new(batch);
        self.broadcast(|_| Arc::clone(&batch))?;
        if self.optimal_count() < self.opts.min_optimal {
            return Err(MirrorError::NoQuorum(self.opts.min_optimal));
        }
        Ok(())
    }

    /// Runs one job per optimal backend, waits for all of them (or the deadline), degrades
    /// the ones that failed and records that durably before returning.
    fn broadcast(&self, make: impl Fn(&Backend) -> Arc<Batch>) -> Result<(), MirrorError> {
        let targets: Vec<&Arc<Backend>> = self.backends.iter().filter(|b| b.is_optimal()).collect();
        if targets.is_empty() {
            return Err(MirrorError::Failed("no optimal backend".into()));
        }
        let answers = Answers::new(targets.len());
        for (slot, backend) in targets.iter().enumerate() {
            let batch = make(backend);
            let answers = Arc::clone(&answers);
            let b = Arc::clone(backend);
            backend.pool.submit(Box::new(move || answers.put(slot, run_batch(&b, &batch))));
        }
        let results = answers.wait(Instant::now() + self.opts.timeout);
        let mut failures = Vec::new();
        let mut succeeded = 0;
        for (slot, backend) in targets.iter().enumerate() {
            match &results[slot] {
                Some(Ok(())) => succeeded += 1,
                Some(Err(e)) => failures.push((backend, e.to_string(), is_no_space(e))),
                None => failures.push((backend, self.timeout_reason(), false)),
            }
        }
        if failures.is_empty() {
            return Ok(());
        }
        if succeeded == 0 {
            if failures.iter().all(|f| f.2) {
                return Err(MirrorError::NoSpace);
            }
            let reasons: Vec<String> = failures
                .iter()
                .map(|(b, r, _)| format!("{}: {r}", b.location))
                .collect();
            error!("write failed on every backend: {}", reasons.join("; "));
            return Err(MirrorError::Failed(reasons.join("; ")));
        }
        for (backend, reason, _) in &failures {
            backend
                .counters
                .write_errors
                .fetch_add(1, Ordering::Relaxed);
            self.set_degraded(backend, format!("write failed: {reason}"));
        }
        self.record_degradation();
        Ok(())
    }

    fn timeout_reason(&self) -> String {
        format!("no answer within {:?}", self.opts.timeout)
    }

    fn set_degraded(&self, backend: &Backend, reason: String) {
        let mut state = backend.state.lock();
        if *state == BackendState::Optimal {
            warn!(
                "backend {} (member {}) degraded: {reason}",
                backend.location, backend.id
            );
            *state = BackendState::Degraded(reason);
        }
    }

    /// Bumps the generation on the remaining optimal backends so that the degraded ones are
    /// recognisably stale; repeats if writing the superblocks degrades more backends.
    fn record_degradation(&self) {
        let mut sb = self.sb.lock();
        sb.generation += 1;
        self.refresh_member_table(&mut sb);
        if let Err(e) = self.write_superblocks(&sb) {
            error!("could not record a degraded backend: {e}");
        }
        let optimal = self.optimal_count();
        if optimal < self.opts.min_optimal {
            error!(
                "only {optimal} optimal backend(s), quorum is {}: refusing writes",
                self.opts.min_optimal
            );
        }
    }

    /// Reads from one optimal backend, failing over to the others on error or timeout.
    pub fn read<T, F>(&self, f: F) -> Result<T, MirrorError>
    where
        T: Send + 'static,
        F: Fn(&dyn Store) -> StoreResult<T> + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        let n = self.backends.len();
        let start = self.next_read.fetch_add(1, Ordering::Relaxed);
        let mut last_error = String::from("no optimal backend");
        for i in 0..n {
            let backend = &self.backends[(start + i) % n];
            if !backend.is_optimal() {
                continue;
            }
            match self.read_one(backend, Arc::clone(&f)) {
                Some(Ok(v)) => return Ok(v),
                Some(Err(StoreError::NotFound)) => return Err(MirrorError::NotFound),
                Some(Err(e)) => {
                    backend.counters.read_errors.fetch_add(1, Ordering::Relaxed);
                    last_error = format!("{}: {e}", backend.location);
                    self.set_degraded(backend, format!("read failed: {e}"));
                    self.record_degradation_if_writable();
                }
                None => {
                    last_error = format!("{}: {}", backend.location, self.timeout_reason());
                    self.set_degraded(backend, self.timeout_reason());
                    self.record_degradation_if_writable();
                }
            }
        }
        Err(MirrorError::Failed(last_error))
    }

    fn record_degradation_if_writable(&self) {
        if !self.opts.read_only {
            self.record_degradation();
        }
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
            a.put(0, f(b.store.as_ref()));
        }));
        answer.wait(Instant::now() + self.opts.timeout).pop().flatten()
    }

    /// Reads a whole object.
    pub fn get(&self, key: &str) -> Result<Vec<u8>, MirrorError> {
        let key = key.to_string();
        let data = self.read(move |s| s.get(&key))?;
        Ok(data)
    }

    /// Reads a byte range of an object (short at its end).
    pub fn get_range(&self, key: &str, offset: u64, len: usize) -> Result<Vec<u8>, MirrorError> {
        let key = key.to_string();
        self.read(move |s| s.get_range(&key, offset, len))
    }

    /// Lists keys under a prefix.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>, MirrorError> {
        let prefix = prefix.to_string();
        self.read(move |s| s.list(&prefix))
    }

    /// Total and free bytes: the smallest free space of the optimal backends.
    pub fn space(&self) -> Option<(u64, u64)> {
        self.backends
            .iter()
            .filter(|b| b.is_optimal())
            .filter_map(|b| b.store.space())
            .min_by_key(|(_, free)| *free)
    }
}

/// Formats empty stores as the members of one new mirror: writes `contents` (the objects
/// of an empty filesystem) and then a superblock to each, and syncs. Returns the new
/// filesystem's uuid. Member ids follow the order of `stores`.
pub fn format(stores: &[(String, Arc<dyn Store>)], contents: &Batch) -> StoreResult<String> {
    let members: Vec<MemberRecord> = stores
        .iter()
        .enumerate()
        .map(|(i, (location, _))| MemberRecord {
            id: i as u32,
            location: location.clone(),
            degraded: String::new(),
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
    };
    for (i, (_, store)) in stores.iter().enumerate() {
        for m in contents {
            m.apply(store.as_ref())?;
        }
        let mut own = sb.clone();
        own.member_id = i as u32;
        store.put(SUPERBLOCK_KEY, &own.encode())?;
        store.sync()?;
    }
    Ok(sb.fs_uuid)
}

fn run_batch(backend: &Backend, batch: &Batch) -> StoreResult<()> {
    for m in batch.iter() {
        m.apply(backend.store.as_ref())?;
        backend.counters.writes.fetch_add(1, Ordering::Relaxed);
        backend
            .counters
            .bytes_written
            .fetch_add(m.bytes(), Ordering::Relaxed);
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

#[cfg(test)]
mod tests;
