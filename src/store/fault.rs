//! A fault-injecting wrapper for tests and benchmarks.
//!
//! Wraps any store and, following rules added at run time, makes a chosen call fail, stall
//! (sleep, then proceed) or corrupt its data. A rule matches one kind of operation (or all)
//! and either the Nth matching call only or every matching call from now on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::{LockIntent, Store, StoreError, StoreResult};

/// The kinds of store calls a rule can match (`Put` also matches `create` and `rewrite`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Get,
    Put,
    WriteAt,
    Truncate,
    Delete,
    List,
    Sync,
}

/// What happens to a matched call.
#[derive(Clone, Copy, Debug)]
pub enum FaultKind {
    /// The call fails with an I/O error and does nothing.
    Fail,
    /// The call sleeps this long, then proceeds normally.
    Stall(Duration),
    /// The call proceeds with one byte flipped (in what is read or what is written).
    Corrupt,
}

#[derive(Clone, Debug)]
struct Rule {
    op: Option<Op>,
    /// Only the Nth matching call (1-based) counted from when the rule was added; `None`
    /// matches every call.
    nth: Option<u64>,
    seen: u64,
    kind: FaultKind,
}

/// A store whose calls can be made to fail, stall or corrupt.
pub struct FaultStore {
    inner: Arc<dyn Store>,
    rules: Mutex<Vec<Rule>>,
    calls: AtomicU64,
}

impl FaultStore {
    /// Wraps `inner` with no rules: it behaves exactly like `inner`.
    pub fn new(inner: Arc<dyn Store>) -> FaultStore {
        FaultStore {
            inner,
            rules: Mutex::new(Vec::new()),
            calls: AtomicU64::new(0),
        }
    }

    /// Applies `kind` to the `nth` (1-based) next call of `op` (any op when `None`).
    pub fn fault_nth(&self, op: Option<Op>, nth: u64, kind: FaultKind) {
        self.rules.lock().push(Rule {
            op,
            nth: Some(nth),
            seen: 0,
            kind,
        });
    }

    /// Applies `kind` to every call of `op` (any op when `None`) from now on.
    pub fn fault_always(&self, op: Option<Op>, kind: FaultKind) {
        self.rules.lock().push(Rule {
            op,
            nth: None,
            seen: 0,
            kind,
        });
    }

    /// Removes every rule.
    pub fn clear(&self) {
        self.rules.lock().clear();
    }

    /// Number of calls made through this wrapper.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Finds what to do with this call; stalls are served here, the rest by the caller.
    fn check(&self, op: Op) -> Option<FaultKind> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mut hit = None;
        for rule in self.rules.lock().iter_mut() {
            if rule.op.is_some_and(|o| o != op) {
                continue;
            }
            rule.seen += 1;
            if rule.nth.is_none_or(|n| n == rule.seen) && hit.is_none() {
                hit = Some(rule.kind);
            }
        }
        if let Some(FaultKind::Stall(d)) = hit {
            std::thread::sleep(d);
            return None;
        }
        hit
    }
}

fn injected() -> StoreError {
    StoreError::Io(std::io::Error::other("injected fault"))
}

fn flip(mut data: Vec<u8>) -> Vec<u8> {
    let middle = data.len() / 2;
    if let Some(b) = data.get_mut(middle) {
        *b ^= 0x5a;
    }
    data
}

impl Store for FaultStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn get(&self, key: &str) -> StoreResult<Vec<u8>> {
        match self.check(Op::Get) {
            Some(FaultKind::Fail) => Err(injected()),
            Some(FaultKind::Corrupt) => self.inner.get(key).map(flip),
            _ => self.inner.get(key),
        }
    }

    fn size(&self, key: &str) -> StoreResult<u64> {
        match self.check(Op::Get) {
            Some(FaultKind::Fail) => Err(injected()),
            _ => self.inner.size(key),
        }
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> StoreResult<Vec<u8>> {
        match self.check(Op::Get) {
            Some(FaultKind::Fail) => Err(injected()),
            Some(FaultKind::Corrupt) => self.inner.get_range(key, offset, len).map(flip),
            _ => self.inner.get_range(key, offset, len),
        }
    }

    fn put(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        match self.check(Op::Put) {
            Some(FaultKind::Fail) => Err(injected()),
            Some(FaultKind::Corrupt) => self.inner.put(key, &flip(data.to_vec())),
            _ => self.inner.put(key, data),
        }
    }

    fn rewrite(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        match self.check(Op::Put) {
            Some(FaultKind::Fail) => Err(injected()),
            Some(FaultKind::Corrupt) => self.inner.rewrite(key, &flip(data.to_vec())),
            _ => self.inner.rewrite(key, data),
        }
    }

    fn create(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        match self.check(Op::Put) {
            Some(FaultKind::Fail) => Err(injected()),
            Some(FaultKind::Corrupt) => self.inner.create(key, &flip(data.to_vec())),
            _ => self.inner.create(key, data),
        }
    }

    fn write_at(&self, key: &str, offset: u64, data: &[u8]) -> StoreResult<()> {
        match self.check(Op::WriteAt) {
            Some(FaultKind::Fail) => Err(injected()),
            Some(FaultKind::Corrupt) => self.inner.write_at(key, offset, &flip(data.to_vec())),
            _ => self.inner.write_at(key, offset, data),
        }
    }

    fn truncate(&self, key: &str, len: u64) -> StoreResult<()> {
        match self.check(Op::Truncate) {
            Some(FaultKind::Fail) => Err(injected()),
            _ => self.inner.truncate(key, len),
        }
    }

    fn delete(&self, key: &str) -> StoreResult<()> {
        match self.check(Op::Delete) {
            Some(FaultKind::Fail) => Err(injected()),
            _ => self.inner.delete(key),
        }
    }

    fn list(&self, prefix: &str) -> StoreResult<Vec<String>> {
        match self.check(Op::List) {
            Some(FaultKind::Fail) => Err(injected()),
            _ => self.inner.list(prefix),
        }
    }

    fn sync(&self) -> StoreResult<()> {
        match self.check(Op::Sync) {
            Some(FaultKind::Fail) => Err(injected()),
            _ => self.inner.sync(),
        }
    }

    fn ranged_writes(&self) -> bool {
        self.inner.ranged_writes()
    }

    fn lock(&self, intent: LockIntent) -> StoreResult<Option<Box<dyn Send + Sync>>> {
        self.inner.lock(intent)
    }

    fn check(&self) -> Result<(), String> {
        self.inner.check()
    }
}
