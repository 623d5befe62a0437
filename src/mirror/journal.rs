//! The crash journal: what lets a mount after a crash bring every backend back to one state
//! by looking only at the objects that could have been in flight.
//!
//! # What is written
//!
//! Every write batch gets a sequence number. Each backend that can write byte ranges keeps
//! an append-only object, [`layout::JOURNAL_KEY`]; the job that applies a batch on a
//! backend first appends an *entry* describing the batch, then applies it, then appends an
//! *ok* line for it, all in that backend's order. Both lines have their place reserved up
//! front, so every backend's journal has the same layout, and a line never written reads
//! as zeros (skipped). Each line carries its own CRC-32C, so a torn line is ignored.
//!
//! An entry describes the batch's mutations so that they can be redone: directory entries,
//! inodes, deletes, truncations, in full (they are small); a data write only by its key
//! and byte range, because copying every data write into the journal would double the
//! bytes written.
//!
//! # After a crash
//!
//! A batch whose ok line is missing on some backend may have been cut short there. Because
//! the fs layer holds the lock of every inode a batch changes until the batch is
//! acknowledged, no later batch can have changed the same objects, so redoing it is safe.
//! [`Mirror::repair_after_crash`], run by a read-write mount that finds the clean flag
//! unset, does this for every such batch, in order:
//!
//! 1. the byte ranges of its data writes get fresh checksums on every backend (a write
//!    may have reached the data and not its checksum: both old and new bytes are
//!    acceptable for a write that was never acknowledged, but the checksum must match);
//! 2. its other mutations are redone on every backend;
//! 3. each data block it wrote is copied from a backend that completed the batch (or the
//!    first one) to the others, so all copies are equal.
//!
//! Then every file written since the journal began gets a size that covers its data
//! (sizes changed by `write` reach the backends lazily, see [`crate::fs`]), and the journal
//! starts afresh. The journal only describes what the page cache held, so it is trusted
//! only when the crash was a crash of the mount process (the machine's boot id, stored in
//! the superblock, is unchanged). After a reboot, or when no backend keeps a journal (only
//! object stores), the mount runs fsck's repair over its backends instead
//! ([`crate::fsck::repair_mounted`]).
//!
//! # Growth
//!
//! When the journal passes [`CHECKPOINT_BYTES`] (and at least [`CHECKPOINT_MIN_AGE`] after
//! the last checkpoint), writes pause for a moment while it is emptied; files written in the
//! previous period are carried over into a `carry` line, so their sizes are still checked
//! after a crash.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};
use serde::{Deserialize, Serialize};

use super::{Backend, Batch, Mirror, Mutation};
use crate::layout::{self, InodeRecord, KeyKind, Kind, JOURNAL_KEY};
use crate::store::{ObjectCopy, StoreError};

/// Journal size above which it is emptied.
pub const CHECKPOINT_BYTES: u64 = 8 << 20;

/// Shortest time between two checkpoints: longer than the fs layer's writeback interval, so
/// that a file's size has reached the backends before the file leaves the carry set.
pub const CHECKPOINT_MIN_AGE: Duration = Duration::from_secs(3);

/// One mutation as the journal records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// A whole small object, redone by writing it again.
    Put {
        k: String,
        d: String,
    },
    /// Bytes `o..o+n` of a data block may have changed; the block is made equal everywhere.
    Data {
        k: String,
        o: u64,
        n: u64,
    },
    Truncate {
        k: String,
        l: u64,
    },
    Delete {
        k: String,
    },
    Trim {
        i: u64,
        f: u64,
        t: u64,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(untagged)]
enum Line {
    Entry { s: u64, m: Vec<Op> },
    Ok { ok: u64 },
    Carry { carry: Vec<u64> },
}

/// Journal bookkeeping of a mount.
pub struct JournalState {
    /// Next sequence number.
    seq: u64,
    /// Where the next line goes.
    offset: u64,
    epoch_started: Instant,
    /// Files written since the last checkpoint.
    written: HashSet<u64>,
    /// [`CHECKPOINT_BYTES`] and [`CHECKPOINT_MIN_AGE`], smaller in tests.
    pub(super) checkpoint_bytes: u64,
    pub(super) checkpoint_age: Duration,
}

impl JournalState {
    pub fn new() -> JournalState {
        JournalState {
            seq: 1,
            offset: 0,
            epoch_started: Instant::now(),
            written: HashSet::new(),
            checkpoint_bytes: CHECKPOINT_BYTES,
            checkpoint_age: CHECKPOINT_MIN_AGE,
        }
    }
}

impl Default for JournalState {
    fn default() -> Self {
        JournalState::new()
    }
}

fn seal(line: &Line) -> Vec<u8> {
    let json = serde_json::to_vec(line).expect("journal line serialises");
    let mut out = format!("{:08x} ", crc32c::crc32c(&json)).into_bytes();
    out.extend_from_slice(&json);
    out.push(b'\n');
    out
}

/// The journal form of a batch; `None` when there is nothing to redo (only syncs).
pub fn ops_of(batch: &Batch) -> Vec<Op> {
    let mut ops = Vec::new();
    for m in batch {
        match m {
            Mutation::Put { key, data }
            | Mutation::Rewrite { key, data }
            | Mutation::Create { key, data } => {
                let small = layout::key_kind(key) == KeyKind::Record;
                match std::str::from_utf8(data) {
                    Ok(text) if small => ops.push(Op::Put {
                        k: key.clone(),
                        d: text.to_string(),
                    }),
                    _ => ops.push(Op::Data {
                        k: key.clone(),
                        o: 0,
                        n: data.len() as u64,
                    }),
                }
            }
            Mutation::WriteAt { key, offset, data } => ops.push(Op::Data {
                k: key.clone(),
                o: *offset,
                n: data.len() as u64,
            }),
            Mutation::Truncate { key, len } => ops.push(Op::Truncate {
                k: key.clone(),
                l: *len,
            }),
            Mutation::Delete { key } => ops.push(Op::Delete { k: key.clone() }),
            Mutation::TrimBlocks { ino, from, to } => ops.push(Op::Trim {
                i: *ino,
                f: *from,
                t: *to,
            }),
            Mutation::Sync | Mutation::Flush { .. } => {}
        }
    }
    ops
}

/// What a backend's journal holds.
#[derive(Debug, Default)]
pub struct Parsed {
    pub entries: BTreeMap<u64, Vec<Op>>,
    pub oks: BTreeSet<u64>,
    pub carried: BTreeSet<u64>,
}

/// Reads the intact lines of a journal.
pub fn parse(data: &[u8]) -> Parsed {
    let mut parsed = Parsed::default();
    for raw in data.split(|&b| b == b'\n') {
        let start = raw.iter().position(|&b| b != 0).unwrap_or(raw.len());
        let line = &raw[start..];
        if line.len() < 10 || line[8] != b' ' {
            continue;
        }
        let Some(want) = std::str::from_utf8(&line[..8])
            .ok()
            .and_then(|h| u32::from_str_radix(h, 16).ok())
        else {
            continue;
        };
        let json = &line[9..];
        if crc32c::crc32c(json) != want {
            continue;
        }
        match serde_json::from_slice::<Line>(json) {
            Ok(Line::Entry { s, m }) => {
                parsed.entries.insert(s, m);
            }
            Ok(Line::Ok { ok }) => {
                parsed.oks.insert(ok);
            }
            Ok(Line::Carry { carry }) => parsed.carried.extend(carry),
            Err(_) => {}
        }
    }
    parsed
}

/// A batch as sent to backends that keep a journal: entry, the batch, ok.
pub struct Journaled {
    pub before: Mutation,
    pub after: Mutation,
}

impl Mirror {
    /// Reserves the journal lines of `batch`; `None` when it needs none.
    pub(super) fn journal_lines(&self, batch: &Batch) -> Option<Journaled> {
        let ops = ops_of(batch);
        if ops.is_empty() {
            return None;
        }
        let mut j = self.journal.lock();
        for op in &ops {
            if let Op::Data { k, .. } = op {
                if let Some(ino) = layout::key_ino(k) {
                    j.written.insert(ino);
                }
            }
        }
        let seq = j.seq;
        j.seq += 1;
        let entry = seal(&Line::Entry { s: seq, m: ops });
        let ok = seal(&Line::Ok { ok: seq });
        let at = j.offset;
        let ok_at = at + entry.len() as u64;
        j.offset = ok_at + ok.len() as u64;
        Some(Journaled {
            before: Mutation::WriteAt {
                key: JOURNAL_KEY.into(),
                offset: at,
                data: entry.into(),
            },
            after: Mutation::WriteAt {
                key: JOURNAL_KEY.into(),
                offset: ok_at,
                data: ok.into(),
            },
        })
    }

    /// Empties the journal when it has grown past [`CHECKPOINT_BYTES`]. Waits for every
    /// write in flight (they hold `switch` shared), so every line in it is complete.
    pub(super) fn maybe_checkpoint(&self) {
        {
            let j = self.journal.lock();
            if j.offset < j.checkpoint_bytes || j.epoch_started.elapsed() < j.checkpoint_age {
                return;
            }
        }
        let _all = self.switch.write();
        {
            let j = self.journal.lock();
            if j.offset < j.checkpoint_bytes {
                return;
            }
        }
        self.checkpoint_locked();
    }

    /// Empties every optimal backend's journal. The caller holds `switch` exclusively, so no
    /// batch is in flight. Also run when a member becomes optimal again, so that every
    /// current member's journal describes the same batches.
    pub(super) fn checkpoint_locked(&self) {
        // Buffering backends send what they hold first: the journal is what would tell a
        // crash repair that they missed it.
        let buffering: Vec<Arc<Backend>> = self
            .optimal()
            .into_iter()
            .filter(|b| !b.store.ranged_writes())
            .collect();
        let flush = Arc::new(vec![Mutation::Flush {
            prefix: String::new(),
        }]);
        let results = self.run_jobs(&buffering, |_| Arc::clone(&flush));
        for (b, reason, _) in self.failures(&buffering, &results) {
            b.counters.write_errors.fetch_add(1, Ordering::Relaxed);
            self.set_degraded(&b, format!("write failed: {reason}"));
        }
        let mut j = self.journal.lock();
        let mut carry: Vec<u64> = j.written.drain().collect();
        carry.sort_unstable();
        let line = seal(&Line::Carry { carry });
        let batch = Arc::new(vec![
            Mutation::Truncate {
                key: JOURNAL_KEY.into(),
                len: 0,
            },
            Mutation::WriteAt {
                key: JOURNAL_KEY.into(),
                offset: 0,
                data: line.clone().into(),
            },
        ]);
        let targets: Vec<Arc<Backend>> = self
            .optimal()
            .into_iter()
            .filter(|b| b.store.ranged_writes())
            .collect();
        let results = self.run_jobs(&targets, |_| Arc::clone(&batch));
        for (b, reason, _) in self.failures(&targets, &results) {
            b.counters.write_errors.fetch_add(1, Ordering::Relaxed);
            self.set_degraded(&b, format!("write failed: journal checkpoint: {reason}"));
        }
        j.offset = line.len() as u64;
        j.epoch_started = Instant::now();
    }

    /// See the module docs. `same_boot` says the page cache survived the crash.
    pub(super) fn repair_after_crash(&self, same_boot: bool) -> Result<(), String> {
        let current = self.optimal();
        let journaled: Vec<&Arc<Backend>> =
            current.iter().filter(|b| b.store.ranged_writes()).collect();
        if !same_boot || journaled.is_empty() {
            warn!(
                "unclean shutdown{}: comparing every object of the {} current backends",
                if same_boot { "" } else { " across a reboot" },
                current.len()
            );
            return self.repair_everything(&current);
        }
        let mut parsed = Vec::new();
        for b in &journaled {
            match b.store.get(JOURNAL_KEY) {
                Ok(data) => parsed.push(parse(&data)),
                Err(StoreError::NotFound) => parsed.push(Parsed::default()),
                Err(e) => return Err(format!("reading the journal of {}: {e}", b.location)),
            }
        }
        let mut entries: BTreeMap<u64, Vec<Op>> = BTreeMap::new();
        let mut written: BTreeSet<u64> = BTreeSet::new();
        for p in &parsed {
            written.extend(&p.carried);
            for (seq, ops) in &p.entries {
                entries.entry(*seq).or_insert_with(|| ops.clone());
            }
        }
        let incomplete: Vec<u64> = entries
            .keys()
            .copied()
            .filter(|seq| parsed.iter().any(|p| !p.oks.contains(seq)))
            .collect();
        for ops in entries.values() {
            for op in ops {
                if let Op::Data { k, .. } = op {
                    written.extend(layout::key_ino(k));
                }
            }
        }
        info!(
            "unclean shutdown: {} journaled batches, {} possibly incomplete; repairing them",
            entries.len(),
            incomplete.len()
        );
        for seq in &incomplete {
            let ops = &entries[seq];
            // Which backends completed the batch: their data wins.
            let done: Vec<u32> = journaled
                .iter()
                .zip(&parsed)
                .filter(|(_, p)| p.oks.contains(seq))
                .map(|(b, _)| b.id)
                .collect();
            self.redo(&current, ops, &done)?;
        }
        // Backends that buffer writes in memory lost what they held: give them every block
        // written since the journal began.
        let buffering = current.iter().any(|b| !b.store.ranged_writes());
        if buffering {
            let source = journaled[0];
            let mut keys = BTreeSet::new();
            for ops in entries.values() {
                for op in ops {
                    if let Op::Data { k, .. } | Op::Truncate { k, .. } = op {
                        keys.insert(k.clone());
                    }
                }
            }
            info!(
                "bringing {} blocks to the backends without a journal",
                keys.len()
            );
            for k in &keys {
                self.copy_from(source, &current, k)?;
            }
        }
        self.fix_sizes(&current, &written)?;
        Ok(())
    }

    /// Redoes one batch on every current backend (step 1 to 3 of the module docs).
    fn redo(&self, current: &[Arc<Backend>], ops: &[Op], done: &[u32]) -> Result<(), String> {
        let fail = |b: &Backend, e: StoreError| format!("repairing {}: {e}", b.location);
        for op in ops {
            let (k, from, to) = match op {
                Op::Data { k, o, n } => (k, *o, o + n),
                Op::Truncate { k, l } if layout::key_kind(k) == KeyKind::Block => (k, *l, u64::MAX),
                _ => continue,
            };
            for b in current {
                match b.store.reseal(k, from, to) {
                    Ok(()) | Err(StoreError::NotFound) => {}
                    Err(e) => return Err(fail(b, e)),
                }
            }
        }
        for op in ops {
            for b in current {
                let result = match op {
                    Op::Put { k, d } => b.store.put(k, d.as_bytes()),
                    Op::Truncate { k, l } => b.store.truncate(k, *l),
                    Op::Delete { k } => b.store.delete(k),
                    Op::Trim { i, f, t } => (*f..*t).try_for_each(|index| {
                        match b.store.delete(&layout::block_key(*i, index)) {
                            Err(StoreError::NotFound) => Ok(()),
                            other => other,
                        }
                    }),
                    Op::Data { .. } => Ok(()),
                };
                match result {
                    Ok(()) | Err(StoreError::NotFound) => {}
                    Err(e) => return Err(fail(b, e)),
                }
            }
        }
        let data_keys: BTreeSet<&String> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Data { k, .. } | Op::Truncate { k, .. } => Some(k),
                _ => None,
            })
            .collect();
        let winner = current
            .iter()
            .find(|b| done.contains(&b.id))
            .unwrap_or(&current[0]);
        for k in data_keys {
            self.copy_from(winner, current, k)?;
        }
        Ok(())
    }

    /// Makes every backend's copy of `key` equal to `source`'s (absent included).
    fn copy_from(
        &self,
        source: &Backend,
        current: &[Arc<Backend>],
        key: &str,
    ) -> Result<(), String> {
        // `skip`: the backend whose copy is spread, which needs no comparison.
        let (wanted, skip) = match source.store.get(key) {
            Ok(d) => (Some(d), Some(source.id)),
            Err(StoreError::NotFound) => (None, Some(source.id)),
            Err(StoreError::Corrupt(why)) => {
                (Some(self.good_copy_for_repair(current, key, &why)?), None)
            }
            Err(e) => return Err(format!("reading {key} from {}: {e}", source.location)),
        };
        for b in current.iter().filter(|b| Some(b.id) != skip) {
            let result = match &wanted {
                Some(d) => match b.store.get(key) {
                    Ok(have) if have == *d => Ok(()),
                    _ => b.store.put(key, d),
                },
                None => match b.store.delete(key) {
                    Err(StoreError::NotFound) => Ok(()),
                    other => other,
                },
            };
            result.map_err(|e| format!("repairing {key} on {}: {e}", b.location))?;
        }
        Ok(())
    }

    /// The copy of `key` to spread when the preferred one failed its checksum (`why`): the
    /// first good copy in mount order; if there is none and `key` is a data block, the first
    /// backend's bytes with fresh checksums ([`ObjectCopy::resealed`]).
    fn good_copy_for_repair(
        &self,
        current: &[Arc<Backend>],
        key: &str,
        why: &str,
    ) -> Result<Vec<u8>, String> {
        warn!("crash repair: {why}; looking for a good copy");
        if let Some(d) = current.iter().find_map(|b| b.store.get(key).ok()) {
            return Ok(d);
        }
        if layout::key_kind(key) != KeyKind::Block {
            return Err(format!("{key}: no good copy on any backend ({why})"));
        }
        let first = &current[0];
        match ObjectCopy::resealed(first.store.as_ref(), key) {
            ObjectCopy::Good(d) => Ok(d),
            other => Err(format!("repairing {key} on {}: {other:?}", first.location)),
        }
    }

    /// Gives each of `inos` (files written lately) a size that covers its data, on every
    /// current backend.
    fn fix_sizes(&self, current: &[Arc<Backend>], inos: &BTreeSet<u64>) -> Result<(), String> {
        let first = &current[0];
        let block_size = self.block_size();
        for &ino in inos {
            let key = layout::inode_key(ino);
            let Ok(data) = first.store.get(&key) else {
                continue;
            };
            let Ok(mut rec) = InodeRecord::decode(&data) else {
                continue;
            };
            if rec.kind != Kind::File {
                continue;
            }
            let mut end = 0;
            for index in 0..rec.blocks_hw {
                if let Ok(len) = first.store.size(&layout::block_key(ino, index)) {
                    end = end.max(index * block_size + len);
                }
            }
            if end <= rec.size {
                continue;
            }
            info!(
                "inode {ino:#x}: size {} raised to {end} to cover data written before the crash",
                rec.size
            );
            rec.size = end;
            let encoded = rec.encode();
            for b in current {
                b.store
                    .put(&key, &encoded)
                    .map_err(|e| format!("repairing {key} on {}: {e}", b.location))?;
            }
        }
        Ok(())
    }

    /// Checks and repairs the current backends as `fsck --repair` would: every object is
    /// compared (the others are made equal to the first good copy, in mount order), then
    /// the graph: sizes that do not cover their data (sizes changed by `write` reach the
    /// backends lazily), blocks of files removed just before the crash, link counts.
    fn repair_everything(&self, current: &[Arc<Backend>]) -> Result<(), String> {
        let stores = current
            .iter()
            .map(|b| (b.location.clone(), Arc::clone(&b.store)))
            .collect();
        let report = crate::fsck::repair_mounted(stores)?;
        for line in &report.lines {
            warn!("after the unclean shutdown: {line}");
        }
        info!("after the unclean shutdown: {}", report.summary());
        // The repair may have given /lost+found an inode number: never hand it out again.
        let mut sb = self.sb.lock();
        for b in current {
            if let Ok(on_disk) = b.store.get(layout::SUPERBLOCK_KEY) {
                if let Ok(on_disk) = layout::Superblock::decode(&on_disk) {
                    sb.next_ino = sb.next_ino.max(on_disk.next_ino);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_torn_lines_are_skipped() {
        let batch = vec![
            Mutation::Rewrite {
                key: layout::inode_key(5),
                data: b"{\"x\":1}".to_vec().into(),
            },
            Mutation::WriteAt {
                key: layout::block_key(5, 0),
                offset: 7,
                data: vec![1u8; 100].into(),
            },
            Mutation::Sync,
        ];
        let ops = ops_of(&batch);
        assert_eq!(ops.len(), 2);
        let mut data = seal(&Line::Entry {
            s: 3,
            m: ops.clone(),
        });
        data.extend(vec![0u8; 20]);
        data.extend(seal(&Line::Ok { ok: 3 }));
        let mut torn = seal(&Line::Entry { s: 4, m: ops });
        torn.truncate(torn.len() / 2);
        data.extend(torn);
        let p = parse(&data);
        assert_eq!(p.entries.len(), 1);
        assert!(p.oks.contains(&3));
        assert_eq!(
            p.entries[&3][1],
            Op::Data {
                k: layout::block_key(5, 0),
                o: 7,
                n: 100
            }
        );
    }
}
