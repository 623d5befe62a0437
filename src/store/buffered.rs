//! Write buffering for stores that cannot write a byte range (object stores).
//!
//! On a bucket, writing 128 KiB into a 1 MiB block means reading the whole block and
//! writing it back. [`BufferedStore`] instead keeps an image of each data block being
//! written in memory and sends it as one whole-object write when:
//!
//! - the block is complete (its image reaches the block size),
//! - the file is flushed or closed ([`Store::flush`] with the file's block prefix), or
//!   `fsync`ed, or the filesystem unmounted ([`Store::sync`]),
//! - the memory for images, shared by every buffering backend of a mount and bounded by
//!   [`WriteBudget`], runs out: the writer that needs more sends this backend's images first
//!   and only then goes on (backpressure, never unbounded growth).
//!
//! Reads of a block with an image are answered from it, so the mount always reads what it
//! wrote. Other keys, and other kinds of mutation, go straight to the wrapped store.
//!
//! Reads of part of a block fetch (and verify) the whole block once and keep the last few
//! blocks read, so that a file read in 128 KiB pieces costs one request per block rather
//! than two per piece. Any change of a block drops it from that cache, and a read that
//! overlapped a change does not keep what it fetched. Whole-object reads ([`Store::get`],
//! used by scrub, healing and recovery) always go to the store.
//!
//! What this changes in the guarantees: on a buffering backend, `write` returns once the
//! bytes are in the mount's memory; `close`, `fsync` and unmount return only once they are
//! in the bucket. The crash repair knows this (see [`crate::mirror::journal`]): after a crash
//! of the mount process, the blocks written since the journal began are copied to buffering
//! backends from a backend with a journal.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::{LockIntent, Store, StoreResult};
use crate::layout::{self, KeyKind};

/// Memory for block images, shared by the buffering backends of one mount.
pub struct WriteBudget {
    used: Mutex<usize>,
    freed: Condvar,
    limit: usize,
}

impl WriteBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<WriteBudget> {
        Arc::new(WriteBudget {
            used: Mutex::new(0),
            freed: Condvar::new(),
            limit,
        })
    }

    /// Bytes currently held by images.
    pub fn used(&self) -> usize {
        *self.used.lock()
    }

    /// Takes `n` bytes if they fit.
    fn try_take(&self, n: usize) -> bool {
        let mut used = self.used.lock();
        if *used + n > self.limit && *used > 0 {
            return false;
        }
        *used += n;
        true
    }

    /// Takes `n` bytes, waiting for other backends to give some back.
    fn take(&self, n: usize) {
        let mut used = self.used.lock();
        while *used + n > self.limit && *used > 0 {
            self.freed.wait(&mut used);
        }
        *used += n;
    }

    fn give(&self, n: usize) {
        let mut used = self.used.lock();
        *used = used.saturating_sub(n);
        self.freed.notify_all();
    }
}

type Image = Arc<Mutex<Vec<u8>>>;

/// A store that buffers partial data blocks in memory; see the module docs.
pub struct BufferedStore {
    inner: Arc<dyn Store>,
    block_size: usize,
    budget: Arc<WriteBudget>,
    images: Mutex<HashMap<String, Image>>,
    /// Whole blocks recently read, verified, so that a file read in pieces costs one
    /// request per block (see [`ReadCache`]).
    cache: Mutex<ReadCache>,
    /// One fetch of a block at a time: the kernel's readahead asks for several pieces of a
    /// block at once, and they should wait for one request rather than each send one.
    fetching: Vec<Mutex<()>>,
}

/// Blocks kept after a read, in order of use; at most [`READ_CACHE_BLOCKS`].
#[derive(Default)]
struct ReadCache {
    blocks: std::collections::VecDeque<(String, Arc<Vec<u8>>)>,
    /// Bumped by every change of any block: a read that started before a change does not
    /// put what it fetched into the cache.
    changes: u64,
}

/// Blocks kept by the read cache of one buffering backend.
const READ_CACHE_BLOCKS: usize = 8;

impl ReadCache {
    fn get(&mut self, key: &str) -> Option<Arc<Vec<u8>>> {
        let at = self.blocks.iter().position(|(k, _)| k == key)?;
        let entry = self.blocks.remove(at)?;
        let data = Arc::clone(&entry.1);
        self.blocks.push_front(entry);
        Some(data)
    }

    fn forget(&mut self, key: &str) {
        self.changes += 1;
        self.blocks.retain(|(k, _)| k != key);
    }

    fn keep(&mut self, key: &str, data: Arc<Vec<u8>>, seen: u64) {
        if seen != self.changes {
            return;
        }
        self.blocks.retain(|(k, _)| k != key);
        self.blocks.push_front((key.to_string(), data));
        self.blocks.truncate(READ_CACHE_BLOCKS);
    }
}

impl BufferedStore {
    /// Wraps `inner`, whose data blocks hold `block_size` bytes.
    pub fn new(inner: Arc<dyn Store>, block_size: u64, budget: Arc<WriteBudget>) -> BufferedStore {
        BufferedStore {
            inner,
            block_size: block_size as usize,
            budget,
            images: Mutex::new(HashMap::new()),
            cache: Mutex::new(ReadCache::default()),
            fetching: (0..16).map(|_| Mutex::new(())).collect(),
        }
    }

    fn image(&self, key: &str) -> Option<Image> {
        self.images.lock().get(key).cloned()
    }

    /// The image of `key`, loaded from the store when there is none.
    fn image_for_write(&self, key: &str) -> StoreResult<Image> {
        if let Some(image) = self.image(key) {
            return Ok(image);
        }
        if !self.budget.try_take(self.block_size) {
            // Backpressure: send what this backend holds, then wait for room.
            self.flush("")?;
            self.budget.take(self.block_size);
        }
        let content = match self.inner.get(key) {
            Ok(d) => d,
            Err(super::StoreError::NotFound) => Vec::new(),
            Err(e) => {
                self.budget.give(self.block_size);
                return Err(e);
            }
        };
        let image = Arc::new(Mutex::new(content));
        let mut images = self.images.lock();
        match images.get(key) {
            Some(existing) => {
                self.budget.give(self.block_size);
                Ok(Arc::clone(existing))
            }
            None => {
                images.insert(key.to_string(), Arc::clone(&image));
                Ok(image)
            }
        }
    }

    /// Sends the image of `key` to the store and forgets it.
    fn send(&self, key: &str) -> StoreResult<()> {
        let Some(image) = self.image(key) else {
            return Ok(());
        };
        let data = image.lock();
        self.inner.put(key, &data)?;
        // Forgotten while still locked: a writer that got this image earlier finds it gone
        // once it has the lock, and starts over from the store (see `write_at`).
        self.forget(key);
        drop(data);
        Ok(())
    }

    /// Drops the image of `key` without sending it.
    fn forget(&self, key: &str) {
        self.cache.lock().forget(key);
        if self.images.lock().remove(key).is_some() {
            self.budget.give(self.block_size);
        }
    }

    fn keys_with(&self, prefix: &str) -> Vec<String> {
        self.images
            .lock()
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    }
}

impl Store for BufferedStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn get(&self, key: &str) -> StoreResult<Vec<u8>> {
        match self.image(key) {
            Some(image) => Ok(image.lock().clone()),
            None => self.inner.get(key),
        }
    }

    fn size(&self, key: &str) -> StoreResult<u64> {
        match self.image(key) {
            Some(image) => Ok(image.lock().len() as u64),
            None => self.inner.size(key),
        }
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> StoreResult<Vec<u8>> {
        match self.image(key) {
            Some(image) => {
                let data = image.lock();
                let start = (offset as usize).min(data.len());
                let end = start.saturating_add(len).min(data.len());
                Ok(data[start..end].to_vec())
            }
            None if layout::key_kind(key) == KeyKind::Block => {
                let cached = self.cache.lock().get(key);
                let block = match cached {
                    Some(block) => block,
                    None => {
                        let stripe = key
                            .bytes()
                            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
                        let _one = self.fetching[stripe % self.fetching.len()].lock();
                        let again = self.cache.lock().get(key);
                        match again {
                            Some(block) => block,
                            None => {
                                let seen = self.cache.lock().changes;
                                let block = Arc::new(self.inner.get(key)?);
                                self.cache.lock().keep(key, Arc::clone(&block), seen);
                                block
                            }
                        }
                    }
                };
                let start = (offset as usize).min(block.len());
                let end = start.saturating_add(len).min(block.len());
                Ok(block[start..end].to_vec())
            }
            None => self.inner.get_range(key, offset, len),
        }
    }

    fn put(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        self.forget(key);
        self.inner.put(key, data)
    }

    fn create(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        self.forget(key);
        self.inner.create(key, data)
    }

    fn rewrite(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        self.forget(key);
        self.inner.rewrite(key, data)
    }

    fn write_at(&self, key: &str, offset: u64, data: &[u8]) -> StoreResult<()> {
        if layout::key_kind(key) != KeyKind::Block {
            return self.inner.write_at(key, offset, data);
        }
        self.cache.lock().forget(key);
        loop {
            let image = self.image_for_write(key)?;
            let mut content = image.lock();
            let current = self
                .images
                .lock()
                .get(key)
                .is_some_and(|i| Arc::ptr_eq(i, &image));
            if !current {
                // Sent (and forgotten) by a flush in between: start over.
                continue;
            }
            let end = offset as usize + data.len();
            if content.len() < end {
                content.resize(end, 0);
            }
            content[offset as usize..end].copy_from_slice(data);
            let full = content.len() >= self.block_size;
            drop(content);
            if full {
                self.send(key)?;
            }
            return Ok(());
        }
    }

    fn truncate(&self, key: &str, len: u64) -> StoreResult<()> {
        self.cache.lock().forget(key);
        match self.image(key) {
            Some(image) => {
                image.lock().resize(len as usize, 0);
                Ok(())
            }
            None => self.inner.truncate(key, len),
        }
    }

    fn delete(&self, key: &str) -> StoreResult<()> {
        let had = self.images.lock().contains_key(key);
        self.forget(key);
        match self.inner.delete(key) {
            Err(super::StoreError::NotFound) if had => Ok(()),
            other => other,
        }
    }

    fn list(&self, prefix: &str) -> StoreResult<Vec<String>> {
        let mut keys = self.inner.list(prefix)?;
        for k in self.keys_with(prefix) {
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        Ok(keys)
    }

    fn sync(&self) -> StoreResult<()> {
        self.flush("")?;
        self.inner.sync()
    }

    fn flush(&self, prefix: &str) -> StoreResult<()> {
        for key in self.keys_with(prefix) {
            self.send(&key)?;
        }
        Ok(())
    }

    fn has_pending(&self, prefix: &str) -> bool {
        self.images.lock().keys().any(|k| k.starts_with(prefix))
    }

    fn ranged_writes(&self) -> bool {
        self.inner.ranged_writes()
    }

    fn reseal(&self, key: &str, from: u64, to: u64) -> StoreResult<()> {
        self.inner.reseal(key, from, to)
    }

    fn lock(&self, intent: LockIntent) -> StoreResult<Option<Box<dyn Send + Sync>>> {
        self.inner.lock(intent)
    }

    fn check(&self) -> Result<(), String> {
        self.inner.check()
    }

    fn space(&self) -> Option<(u64, u64)> {
        self.inner.space()
    }
}

impl Drop for BufferedStore {
    fn drop(&mut self) {
        let held = self.images.lock().len();
        self.budget.give(held * self.block_size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    const BLOCK: u64 = 64 * 1024;

    /// Counts whole-object writes reaching the wrapped store.
    fn rig(limit: usize) -> (Arc<MemoryStore>, BufferedStore, Arc<WriteBudget>) {
        let mem = Arc::new(MemoryStore::new("m"));
        let budget = WriteBudget::new(limit);
        let s = BufferedStore::new(Arc::clone(&mem) as _, BLOCK, Arc::clone(&budget));
        (mem, s, budget)
    }

    #[test]
    fn partial_blocks_stay_in_memory_until_complete_or_flushed() {
        let (mem, s, budget) = rig(1 << 20);
        let a = layout::block_key(3, 0);
        let b = layout::block_key(3, 1);
        s.write_at(&a, 0, &[1u8; 1000]).unwrap();
        s.write_at(&b, 10, b"xyz").unwrap();
        assert!(mem.get(&a).is_err(), "a partial block is not sent");
        assert_eq!(s.get_range(&b, 9, 5).unwrap(), vec![0, b'x', b'y', b'z']);
        assert_eq!(budget.used(), 2 * BLOCK as usize);
        // Completing a block sends it.
        s.write_at(&a, 1000, &vec![2u8; BLOCK as usize - 1000])
            .unwrap();
        assert_eq!(mem.get(&a).unwrap().len(), BLOCK as usize);
        assert!(s.has_pending(&layout::block_key(3, 1)));
        s.flush("b/").unwrap();
        assert_eq!(&mem.get(&b).unwrap()[10..], b"xyz");
        assert_eq!(budget.used(), 0);
        assert!(!s.has_pending("b/"));
    }

    #[test]
    fn a_full_budget_sends_before_taking_more() {
        let (mem, s, budget) = rig(2 * BLOCK as usize);
        for i in 0..5 {
            s.write_at(&layout::block_key(4, i), 0, b"data").unwrap();
            assert!(budget.used() <= 2 * BLOCK as usize);
        }
        assert!(
            mem.get(&layout::block_key(4, 0)).is_ok(),
            "sent under pressure"
        );
        s.sync().unwrap();
        for i in 0..5 {
            assert_eq!(mem.get(&layout::block_key(4, i)).unwrap(), b"data".to_vec());
        }
    }

    #[test]
    fn a_block_read_in_pieces_is_fetched_once_and_dropped_when_changed() {
        let mem = Arc::new(MemoryStore::new("m"));
        let counted = Arc::new(crate::store::FaultStore::new(Arc::clone(&mem) as _));
        let s = BufferedStore::new(Arc::clone(&counted) as _, BLOCK, WriteBudget::new(1 << 20));
        let k = layout::block_key(6, 0);
        mem.put(&k, &[5u8; 5000]).unwrap();
        let before = counted.calls();
        for at in (0..5000).step_by(1000) {
            assert_eq!(s.get_range(&k, at, 1000).unwrap(), vec![5u8; 1000]);
        }
        assert_eq!(counted.calls() - before, 1, "one whole-block read");
        s.put(&k, &[6u8; 10]).unwrap();
        assert_eq!(s.get_range(&k, 0, 100).unwrap(), vec![6u8; 10]);
        s.write_at(&k, 0, b"x").unwrap();
        assert_eq!(s.get_range(&k, 0, 2).unwrap(), b"x\x06".to_vec());
    }

    #[test]
    fn truncate_and_delete_apply_to_the_image() {
        let (mem, s, _) = rig(1 << 20);
        let k = layout::block_key(5, 0);
        mem.put(&k, &[7u8; 100]).unwrap();
        s.write_at(&k, 50, b"ab").unwrap();
        s.truncate(&k, 51).unwrap();
        assert_eq!(s.get(&k).unwrap().len(), 51);
        assert_eq!(s.get(&k).unwrap()[50], b'a');
        s.delete(&k).unwrap();
        assert!(s.get(&k).is_err());
        s.sync().unwrap();
        assert!(mem.get(&k).is_err());
    }
}
