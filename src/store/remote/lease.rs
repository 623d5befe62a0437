//! The lease that keeps two mounts off one bucket prefix.
//!
//! A directory backend is locked with `flock`, which the kernel drops when the process dies.
//! A bucket has nothing like it, so a mount that writes to a prefix holds a *lease*: the
//! object [`LEASE_KEY`] below the prefix names its holder (a random token, host name, boot
//! id, pid and the process's start time) and when it was last renewed. The holder renews it
//! every [`RENEW_EVERY`]; a lease not renewed for [`LEASE_TTL`] is stale.
//!
//! # Taking it
//!
//! - No lease object: it is created with a conditional PUT (`If-None-Match: *`), so of two
//!   mounts starting at once exactly one wins on a server that honours the condition.
//! - A lease held by someone else is waited for up to [`ACQUIRE_WAIT`] (a mount that was
//!   just unmounted may still be releasing it), then the mount is refused with who holds it.
//! - A stale lease is taken over: one whose holder ran on this machine in this boot and has
//!   exited (pid and start time no longer match a process), one from an earlier boot of this
//!   machine, or one not renewed for [`LEASE_TTL`] by its own clock.
//! - After a takeover, or when the server turned out to ignore the condition (checked by
//!   repeating the conditional PUT, which such a server accepts), the mount waits
//!   [`SETTLE`] and reads the lease back: a racer that wrote after it is found then.
//!
//! # Holding and releasing it
//!
//! A thread renews the lease. If it finds another holder's token, the lease was taken over
//! (this mount was frozen for longer than [`LEASE_TTL`], or a racer won on a server without
//! conditional writes): it stops renewing and [`Lease::lost`] says why, which the store's
//! health check turns into a degraded backend. A lease object that vanished is created
//! again. Dropping the [`Lease`] stops the renewals and deletes the object if it is still
//! this mount's. Every lease request gives up after [`REQUEST_LIMIT`], so a hung server
//! delays neither the renewals nor an unmount by more than that.
//!
//! # What it does not guarantee
//!
//! Expiry compares the renewal time written by the holder with the reader's clock: hosts
//! whose clocks differ by more than [`LEASE_TTL`] minus [`RENEW_EVERY`] can take each
//! other's live leases. Between a holder being frozen past the expiry and noticing the
//! takeover at its next renewal, two mounts may write to the prefix; the first to see the
//! other's token degrades the backend.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};

use super::runtime;

/// The lease object, below the prefix. The store's `list` never returns it.
pub const LEASE_KEY: &str = ".lock";

/// A lease not renewed for this long is stale.
pub const LEASE_TTL: Duration = Duration::from_secs(30);

/// How often the holder renews its lease.
pub const RENEW_EVERY: Duration = Duration::from_secs(10);

/// How long a mount waits for a live lease to be released before it gives up.
pub const ACQUIRE_WAIT: Duration = Duration::from_secs(3);

/// How long a mount waits before reading back a lease it took without an atomic condition.
pub const SETTLE: Duration = Duration::from_secs(1);

/// Deadline of every lease request.
pub const REQUEST_LIMIT: Duration = Duration::from_secs(5);

/// Who holds a lease, as stored in the lease object (JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    pub token: String,
    pub host: String,
    pub boot_id: String,
    pub pid: u32,
    /// The holder process's start time (see [`crate::host::process_start`]).
    pub start: u64,
    /// Seconds since the Unix epoch, by the holder's clock.
    pub renewed: u64,
}

impl Holder {
    /// A holder record for this process.
    pub fn this_process() -> Holder {
        let pid = std::process::id();
        Holder {
            token: uuid::Uuid::new_v4().to_string(),
            host: crate::host::hostname(),
            boot_id: crate::host::boot_id(),
            pid,
            start: crate::host::process_start(pid).unwrap_or(0),
            renewed: now(),
        }
    }

    /// Why this lease no longer protects anybody, or `None` while it is live.
    pub fn stale_because(&self) -> Option<String> {
        let same_host = self.host == crate::host::hostname();
        let same_boot = !self.boot_id.is_empty() && self.boot_id == crate::host::boot_id();
        if same_host && same_boot {
            if crate::host::process_start(self.pid) != Some(self.start) {
                return Some(format!("its process {} has exited", self.pid));
            }
            return None;
        }
        if same_host && !self.boot_id.is_empty() {
            return Some("it was taken before this machine rebooted".into());
        }
        let age = now().saturating_sub(self.renewed);
        (age > LEASE_TTL.as_secs()).then(|| format!("it was last renewed {age} s ago"))
    }

    /// `pid 123 on host h, renewed 4 s ago`, for messages.
    pub fn describe(&self) -> String {
        format!(
            "pid {} on host {}, renewed {} s ago",
            self.pid,
            if self.host.is_empty() {
                "?"
            } else {
                &self.host
            },
            now().saturating_sub(self.renewed)
        )
    }

    fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a holder serialises")
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Why a lease request did not succeed.
#[derive(Debug)]
pub enum LeaseError {
    /// Someone else holds a live lease.
    Busy(Holder),
    /// The request failed.
    Request(object_store::Error),
    /// The request did not finish within [`REQUEST_LIMIT`].
    TimedOut,
    /// The lease object changed in a way that leaves no holder (deleted or overwritten by
    /// something else) while this mount was taking it.
    Vanished,
}

impl std::fmt::Display for LeaseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeaseError::Busy(h) => write!(f, "in use by another mirrorfs mount ({})", h.describe()),
            LeaseError::Request(e) => write!(f, "{}", super::innermost(e)),
            LeaseError::TimedOut => write!(f, "no answer within {} s", REQUEST_LIMIT.as_secs()),
            LeaseError::Vanished => write!(f, "the lease object changed while it was taken"),
        }
    }
}

impl From<object_store::Error> for LeaseError {
    fn from(e: object_store::Error) -> Self {
        LeaseError::Request(e)
    }
}

/// The lease object of one prefix and the requests on it.
#[derive(Clone)]
pub struct LeaseObject {
    pub store: Arc<dyn ObjectStore>,
    pub path: ObjPath,
    pub location: String,
}

/// The current lease and its version, as read.
struct Current {
    holder: Option<Holder>,
    version: UpdateVersion,
}

impl LeaseObject {
    fn run<T>(
        &self,
        f: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<T, LeaseError> {
        runtime().block_on(async {
            match tokio::time::timeout(REQUEST_LIMIT, f).await {
                Ok(r) => r.map_err(LeaseError::Request),
                Err(_) => Err(LeaseError::TimedOut),
            }
        })
    }

    /// The lease object, `None` when there is none. An unreadable one (torn by hand,
    /// another program) counts as a lease of nobody: `holder` is `None` but it exists.
    fn read(&self) -> Result<Option<Current>, LeaseError> {
        let got = self.run(async {
            let r = self.store.get(&self.path).await?;
            let version = UpdateVersion {
                e_tag: r.meta.e_tag.clone(),
                version: r.meta.version.clone(),
            };
            Ok((r.bytes().await?, version))
        });
        match got {
            Ok((bytes, version)) => Ok(Some(Current {
                holder: serde_json::from_slice(&bytes).ok(),
                version,
            })),
            Err(LeaseError::Request(object_store::Error::NotFound { .. })) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn put(&self, holder: &Holder, mode: PutMode) -> Result<(), LeaseError> {
        let opts = PutOptions {
            mode,
            ..PutOptions::default()
        };
        let payload = PutPayload::from(holder.encode());
        self.run(self.store.put_opts(&self.path, payload, opts))
            .map(|_| ())
    }

    /// Creates the lease object unless it exists. `Ok(false)`: it exists.
    fn create(&self, holder: &Holder) -> Result<bool, LeaseError> {
        match self.put(holder, PutMode::Create) {
            Ok(()) => Ok(true),
            Err(LeaseError::Request(object_store::Error::AlreadyExists { .. })) => Ok(false),
            Err(LeaseError::Request(object_store::Error::NotImplemented { .. })) => {
                self.put(holder, PutMode::Overwrite).map(|()| true)
            }
            Err(e) => Err(e),
        }
    }

    /// Replaces the lease object at `version`; a server without conditional writes simply
    /// overwrites it (the read-back after [`SETTLE`] covers that case).
    fn replace(&self, holder: &Holder, version: UpdateVersion) -> Result<bool, LeaseError> {
        match self.put(holder, PutMode::Update(version)) {
            Ok(()) => Ok(true),
            Err(LeaseError::Request(object_store::Error::Precondition { .. })) => Ok(false),
            Err(LeaseError::Request(object_store::Error::NotImplemented { .. })) => {
                self.put(holder, PutMode::Overwrite).map(|()| true)
            }
            Err(e) => Err(e),
        }
    }

    fn delete(&self) -> Result<(), LeaseError> {
        self.run(self.store.delete(&self.path))
    }

    /// Fails with [`LeaseError::Busy`] while someone holds a live lease, waiting up to
    /// [`ACQUIRE_WAIT`] for it to go. Takes nothing: for read-only users.
    pub fn check_free(&self) -> Result<(), LeaseError> {
        let deadline = std::time::Instant::now() + ACQUIRE_WAIT;
        loop {
            let holder = match self.read()? {
                Some(Current {
                    holder: Some(h), ..
                }) => h,
                _ => return Ok(()),
            };
            if holder.stale_because().is_some() {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(LeaseError::Busy(holder));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Takes the lease for `me` (see the module docs) and starts renewing it.
    pub fn acquire(&self, mut me: Holder) -> Result<Lease, LeaseError> {
        let deadline = std::time::Instant::now() + ACQUIRE_WAIT;
        let must_verify = loop {
            me.renewed = now();
            let current = match self.read()? {
                None => match self.create(&me)? {
                    true => {
                        let atomic = self.create_is_atomic(&me)?;
                        log::debug!("{}: lease created (atomically: {atomic})", self.location);
                        break !atomic;
                    }
                    false => continue,
                },
                Some(c) => c,
            };
            let why = match &current.holder {
                None => Some("it cannot be read".to_string()),
                Some(h) => h.stale_because(),
            };
            if let Some(why) = why {
                log::warn!("{}: taking over a stale lease ({why})", self.location);
                match self.replace(&me, current.version)? {
                    true => break true,
                    false => continue,
                }
            }
            if std::time::Instant::now() >= deadline {
                return Err(LeaseError::Busy(current.holder.expect("read above")));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if must_verify {
            std::thread::sleep(SETTLE);
            match self.read()? {
                Some(Current {
                    holder: Some(h), ..
                }) if h.token == me.token => {}
                Some(Current {
                    holder: Some(h), ..
                }) => return Err(LeaseError::Busy(h)),
                _ => return Err(LeaseError::Vanished),
            }
        }
        Ok(Lease::start(self.clone(), me))
    }

    /// True when the server refuses a conditional create of an existing object, i.e. the
    /// create that just succeeded could not have raced with another.
    fn create_is_atomic(&self, me: &Holder) -> Result<bool, LeaseError> {
        match self.put(me, PutMode::Create) {
            Err(LeaseError::Request(object_store::Error::AlreadyExists { .. })) => Ok(true),
            // Accepted: the server ignores the condition (and rewrote our own record).
            Ok(()) => Ok(false),
            Err(LeaseError::Request(object_store::Error::NotImplemented { .. })) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// What the renewal thread and the rest of the mount share.
struct Shared {
    /// Set by `Drop`: no renewal may write after it.
    released: parking_lot::Mutex<bool>,
    /// Why the lease was lost, once it is.
    lost: parking_lot::Mutex<Option<String>>,
}

/// A lease held by this process, renewed until it is dropped.
pub struct Lease {
    object: LeaseObject,
    token: String,
    shared: Arc<Shared>,
    stop: Option<crossbeam::channel::Sender<()>>,
}

impl Lease {
    fn start(object: LeaseObject, me: Holder) -> Lease {
        let shared = Arc::new(Shared {
            released: parking_lot::Mutex::new(false),
            lost: parking_lot::Mutex::new(None),
        });
        let (stop, stopped) = crossbeam::channel::bounded::<()>(0);
        let token = me.token.clone();
        let (obj, sh) = (object.clone(), Arc::clone(&shared));
        let spawned = std::thread::Builder::new()
            .name("lease".into())
            .spawn(move || renew_until_stopped(&obj, me, &sh, &stopped));
        if let Err(e) = spawned {
            *shared.lost.lock() = Some(format!("cannot start renewing its lease: {e}"));
        }
        Lease {
            object,
            token,
            shared,
            stop: Some(stop),
        }
    }

    /// Why this mount no longer holds the lease, if it does not.
    pub fn lost(&self) -> Option<String> {
        self.shared.lost.lock().clone()
    }

    /// A handle that reports [`Lease::lost`] without keeping the lease.
    pub fn watcher(&self) -> LeaseWatch {
        LeaseWatch(Arc::clone(&self.shared))
    }
}

/// See [`Lease::watcher`].
#[derive(Clone)]
pub struct LeaseWatch(Arc<Shared>);

impl LeaseWatch {
    /// Why the lease was lost, if it was.
    pub fn lost(&self) -> Option<String> {
        self.0.lost.lock().clone()
    }
}

fn renew_until_stopped(
    object: &LeaseObject,
    mut me: Holder,
    shared: &Shared,
    stopped: &crossbeam::channel::Receiver<()>,
) {
    use crossbeam::channel::RecvTimeoutError;
    while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(RENEW_EVERY) {
        let released = shared.released.lock();
        if *released {
            return;
        }
        match renew_once(object, &mut me) {
            Ok(()) => {}
            Err(Some(why)) => {
                log::error!("{}: {why}", object.location);
                *shared.lost.lock() = Some(why);
                return;
            }
            // Unreachable or refused: the health check reports the server itself. The
            // lease stays ours unless it expires meanwhile, which the next renewal sees.
            Err(None) => log::debug!("{}: lease renewal failed", object.location),
        }
    }
}

/// One renewal. `Err(Some(why))`: the lease is lost; `Err(None)`: the request failed.
fn renew_once(object: &LeaseObject, me: &mut Holder) -> Result<(), Option<String>> {
    me.renewed = now();
    match object.read().map_err(|_| None)? {
        None => {
            log::warn!(
                "{}: the lease object vanished; taking it again",
                object.location
            );
            match object.create(me).map_err(|_| None)? {
                true => Ok(()),
                false => Err(None),
            }
        }
        Some(Current {
            holder: Some(h), ..
        }) if h.token != me.token => Err(Some(format!(
            "the lease on this prefix was taken over by another mount ({})",
            h.describe()
        ))),
        Some(c) => match object.replace(me, c.version).map_err(|_| None)? {
            true => Ok(()),
            // Changed between the read and the write: the next round sees by whom.
            false => Err(None),
        },
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        drop(self.stop.take());
        // Waits for a renewal in flight (bounded by REQUEST_LIMIT), so none writes after
        // the delete below.
        *self.shared.released.lock() = true;
        if self.lost().is_some() {
            return;
        }
        let ours = matches!(
            self.object.read(),
            Ok(Some(Current { holder: Some(h), .. })) if h.token == self.token
        );
        if ours {
            if let Err(e) = self.object.delete() {
                log::warn!(
                    "{}: cannot release the lease ({e}); the next mount takes it over once \
                     it is stale",
                    self.object.location
                );
            }
        }
    }
}
