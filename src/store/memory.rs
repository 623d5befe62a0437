//! An in-memory store for tests: a map from key to bytes behind a mutex.

use std::collections::BTreeMap;

use parking_lot::Mutex;

use super::{Store, StoreError, StoreResult};

/// Objects kept in memory; `sync` is a no-op.
#[derive(Default)]
pub struct MemoryStore {
    name: String,
    objects: Mutex<BTreeMap<String, Vec<u8>>>,
    /// Behave as an object store that cannot write byte ranges.
    whole_objects: bool,
}

impl MemoryStore {
    /// An empty store described as `name` in logs.
    pub fn new(name: &str) -> MemoryStore {
        MemoryStore {
            name: name.to_string(),
            objects: Mutex::new(BTreeMap::new()),
            whole_objects: false,
        }
    }

    /// An empty store that says it cannot write byte ranges, like a bucket (its `write_at`
    /// still works, as a read-modify-write would).
    pub fn whole_objects(name: &str) -> MemoryStore {
        MemoryStore {
            whole_objects: true,
            ..MemoryStore::new(name)
        }
    }

    /// A copy of every object, for comparing stores in tests.
    pub fn snapshot(&self) -> BTreeMap<String, Vec<u8>> {
        self.objects.lock().clone()
    }
}

impl Store for MemoryStore {
    fn describe(&self) -> String {
        format!("memory:{}", self.name)
    }

    fn get(&self, key: &str) -> StoreResult<Vec<u8>> {
        self.objects
            .lock()
            .get(key)
            .cloned()
            .ok_or(StoreError::NotFound)
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> StoreResult<Vec<u8>> {
        let objects = self.objects.lock();
        let data = objects.get(key).ok_or(StoreError::NotFound)?;
        let start = (offset as usize).min(data.len());
        let end = start.saturating_add(len).min(data.len());
        Ok(data[start..end].to_vec())
    }

    fn put(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        self.objects.lock().insert(key.to_string(), data.to_vec());
        Ok(())
    }

    fn write_at(&self, key: &str, offset: u64, data: &[u8]) -> StoreResult<()> {
        let mut objects = self.objects.lock();
        let obj = objects.entry(key.to_string()).or_default();
        let end = offset as usize + data.len();
        if obj.len() < end {
            obj.resize(end, 0);
        }
        obj[offset as usize..end].copy_from_slice(data);
        Ok(())
    }

    fn truncate(&self, key: &str, len: u64) -> StoreResult<()> {
        let mut objects = self.objects.lock();
        objects
            .entry(key.to_string())
            .or_default()
            .resize(len as usize, 0);
        Ok(())
    }

    fn delete(&self, key: &str) -> StoreResult<()> {
        self.objects
            .lock()
            .remove(key)
            .map(|_| ())
            .ok_or(StoreError::NotFound)
    }

    fn list(&self, prefix: &str) -> StoreResult<Vec<String>> {
        let objects = self.objects.lock();
        let keys = objects.range(prefix.to_string()..).map(|(k, _)| k);
        Ok(keys
            .take_while(|k| k.starts_with(prefix))
            .cloned()
            .collect())
    }

    fn sync(&self) -> StoreResult<()> {
        Ok(())
    }

    fn ranged_writes(&self) -> bool {
        !self.whole_objects
    }
}
