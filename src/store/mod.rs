//! The store layer: the only thing the mirror knows about a backend.
//!
//! A store is a flat namespace of objects named by `/`-separated keys. Keys are produced by
//! [`crate::layout`] and are always made of `[0-9a-z._/-]`, so every store can map them to its
//! own naming without escaping.
//!
//! Guarantees every implementation gives:
//! - [`Store::put`] replaces an object atomically: a reader (or a crash) sees the old or the
//!   new content, never a mix.
//! - [`Store::write_at`] and [`Store::truncate`] change a byte range in place where the store
//!   can do that ([`Store::ranged_writes`]); they are not atomic against a crash, which is why
//!   the layout only uses them for file data.
//! - Nothing is guaranteed durable until [`Store::sync`] returns: it is the durability barrier
//!   for every mutation that returned before it was called.
//! - "Not found" is an answer, not a failure: [`StoreError::NotFound`] never degrades a
//!   backend.

mod buffered;
mod checksum;
mod fault;
mod local;
mod memory;
pub mod remote;
pub mod spec;

pub use buffered::{BufferedStore, WriteBudget};
pub use checksum::{open_record, page_sum, seal_record, ChecksumStore, PAGE};
pub use fault::{FaultKind, FaultStore, Op};
pub use local::LocalStore;
pub use memory::MemoryStore;
pub use remote::RemoteStore;

use std::io;

/// Why a store operation did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist. An expected answer, never a backend failure.
    #[error("object not found")]
    NotFound,
    /// The store cannot perform this kind of operation (e.g. ranged writes on a bucket).
    #[error("operation not supported by this store")]
    Unsupported,
    /// The store is full.
    #[error("no space left on backend")]
    NoSpace,
    /// The object's bytes do not match its checksum (see [`ChecksumStore`]).
    #[error("{0}")]
    Corrupt(String),
    /// Any other I/O failure.
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl StoreError {
    /// Converts an `io::Error`, keeping "not found" and "no space" distinguishable.
    pub fn from_io(e: io::Error) -> StoreError {
        match e.kind() {
            io::ErrorKind::NotFound => StoreError::NotFound,
            io::ErrorKind::StorageFull => StoreError::NoSpace,
            _ => StoreError::Io(e),
        }
    }

    /// True for outcomes that are answers rather than failures of the backend.
    pub fn is_expected(&self) -> bool {
        matches!(self, StoreError::NotFound)
    }
}

/// One backend's copy of an object, as a check of the copies (scrub, fsck, crash repair)
/// sees it.
#[derive(Debug)]
pub enum ObjectCopy {
    /// Read and verified.
    Good(Vec<u8>),
    Missing,
    /// Fails its checksum (why).
    Bad(String),
    /// Could not be read (why).
    Failed(String),
}

impl ObjectCopy {
    /// Reads (and so verifies) `store`'s copy of `key`.
    pub fn read(store: &dyn Store, key: &str) -> ObjectCopy {
        match store.get(key) {
            Ok(data) => ObjectCopy::Good(data),
            Err(StoreError::NotFound) => ObjectCopy::Missing,
            Err(StoreError::Corrupt(why)) => ObjectCopy::Bad(why),
            Err(e) => ObjectCopy::Failed(e.to_string()),
        }
    }

    /// Gives `store`'s copy of data block `key` fresh checksums and reads it again: for a
    /// block whose copies all fail their checksums because a write was cut short by a crash
    /// (the write was never acknowledged, so its bytes, old or new, are acceptable).
    pub fn resealed(store: &dyn Store, key: &str) -> ObjectCopy {
        match store.reseal(key, 0, u64::MAX) {
            Ok(()) | Err(StoreError::NotFound) => ObjectCopy::read(store, key),
            Err(e) => ObjectCopy::Failed(format!("cannot reseal it: {e}")),
        }
    }

    /// The bytes of a good copy.
    pub fn good(&self) -> Option<&Vec<u8>> {
        match self {
            ObjectCopy::Good(data) => Some(data),
            _ => None,
        }
    }
}

/// Every key of the filesystem's objects (not the superblock, logs or journal) held by any
/// of `stores` (location, store), sorted.
pub fn object_keys<'a>(
    stores: impl IntoIterator<Item = (&'a str, &'a dyn Store)>,
) -> Result<std::collections::BTreeSet<String>, String> {
    let mut keys = std::collections::BTreeSet::new();
    for (location, store) in stores {
        let listed = store
            .list("")
            .map_err(|e| format!("listing {location}: {e}"))?;
        keys.extend(
            listed
                .into_iter()
                .filter(|k| crate::layout::key_kind(k) != crate::layout::KeyKind::Raw),
        );
    }
    Ok(keys)
}

/// What the caller of [`Store::lock`] is going to do with the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockIntent {
    /// Change it: a read-write mount, `fsck --repair`, a new member.
    Write,
    /// Only read it: a read-only mount, `fsck` without repair. A store whose lock is an
    /// object it would have to write (a bucket lease) takes nothing and only checks that no
    /// one else holds the lock.
    Read,
}

/// Backends by location, as handed to the mirror.
pub type NamedStores = Vec<(String, std::sync::Arc<dyn Store>)>;

/// Result type of store operations.
pub type StoreResult<T> = Result<T, StoreError>;

/// One backend's object storage. Implementations are shared between threads.
pub trait Store: Send + Sync {
    /// A human-readable description used in logs and status (e.g. the directory path).
    fn describe(&self) -> String;

    /// Reads a whole object.
    fn get(&self, key: &str) -> StoreResult<Vec<u8>>;

    /// The size of an object in bytes.
    fn size(&self, key: &str) -> StoreResult<u64> {
        self.get(key).map(|d| d.len() as u64)
    }

    /// Reads up to `len` bytes at `offset`; returns fewer bytes at the end of the object.
    fn get_range(&self, key: &str, offset: u64, len: usize) -> StoreResult<Vec<u8>>;

    /// Creates or atomically replaces a whole object.
    fn put(&self, key: &str, data: &[u8]) -> StoreResult<()>;

    /// Creates an object that nothing refers to yet. Unlike `put` it need not be atomic: a
    /// crash may leave it partly written, which is harmless because no other object names it
    /// until a later mutation does. Stores where this is cheaper than `put` override it.
    fn create(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        self.put(key, data)
    }

    /// Replaces a small object whose encoding ignores trailing ASCII spaces (the JSON
    /// records of [`crate::layout`]). Stores may rewrite it in place, padding with spaces:
    /// that is atomic against a crash of this process when the object fits in one page, and
    /// avoids creating and deleting a file per update. A store that cannot, puts.
    fn rewrite(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        self.put(key, data)
    }

    /// Writes `data` at `offset`, creating the object if needed (a gap reads as zeros).
    fn write_at(&self, key: &str, offset: u64, data: &[u8]) -> StoreResult<()>;

    /// Sets the object's length, creating it if needed; growth reads as zeros.
    fn truncate(&self, key: &str, len: u64) -> StoreResult<()>;

    /// Removes an object. Removing a missing object returns [`StoreError::NotFound`].
    fn delete(&self, key: &str) -> StoreResult<()>;

    /// Lists the keys that start with `prefix`, in no particular order.
    fn list(&self, prefix: &str) -> StoreResult<Vec<String>>;

    /// Durability barrier: every mutation that returned before this call is on stable storage
    /// when it returns.
    fn sync(&self) -> StoreResult<()>;

    /// True when `write_at` and `truncate` change bytes in place at a cost proportional to the
    /// bytes written.
    fn ranged_writes(&self) -> bool;

    /// Recomputes the checksums of bytes `from..to` of a data block from the bytes stored
    /// (see [`ChecksumStore`]): after a crash, the ranges that were being written are
    /// trusted as they are. Stores without checksums have nothing to do.
    fn reseal(&self, _key: &str, _from: u64, _to: u64) -> StoreResult<()> {
        Ok(())
    }

    /// Sends data a store holds in memory (see [`BufferedStore`]) for the keys starting
    /// with `prefix` to where it belongs. Stores that write through have nothing to do.
    fn flush(&self, _prefix: &str) -> StoreResult<()> {
        Ok(())
    }

    /// True when data of keys starting with `prefix` is held in memory, not yet sent.
    fn has_pending(&self, _prefix: &str) -> bool {
        false
    }

    /// Takes an exclusive lock that is held until the returned guard is dropped, so that two
    /// mounts never use one backend at once. Returns `Ok(None)` when the store cannot lock,
    /// or (for [`LockIntent::Read`]) when its lock would have to be written: it then only
    /// checks that nobody holds it.
    fn lock(&self, _intent: LockIntent) -> StoreResult<Option<Box<dyn Send + Sync>>> {
        Ok(None)
    }

    /// Cheap check that the store is still the one that was opened (e.g. a directory not
    /// replaced by an empty mount point after its disk went away). `Err` says why not.
    fn check(&self) -> Result<(), String> {
        Ok(())
    }

    /// Total and free bytes, when the store knows them.
    fn space(&self) -> Option<(u64, u64)> {
        None
    }
}
