//! `mirrorfs fsck`: offline check, and repair, of the backends of one filesystem.
//!
//! The check runs in two passes over the *current* backends (those at the newest
//! generation that the newest superblock records as optimal; a backend that is behind is
//! reported and left alone, because the next mount recovers it from its missed-key log):
//!
//! 1. **Copies.** Every object (except the superblock and the logs) is read from every
//!    current backend, which verifies its checksum. A copy that fails its checksum, is
//!    missing, or differs from the others is a problem; repair rewrites it from the first
//!    good copy in the order the backends were given. An object with no good copy anywhere
//!    cannot be repaired.
//! 2. **Graph**, on the good copies: every directory entry must be in an existing
//!    directory and point at an existing inode of the kind it names (repair removes the
//!    entry, or fixes the kind); every inode but the root must be named by an entry (an
//!    orphan with no links left is removed with its data, one with links is moved to
//!    `/lost+found`); link counts must match the entries (repair sets them); a file's size
//!    must cover its data, and its block high-water mark its blocks (repair raises them, so
//!    no byte is dropped); data blocks of inodes that do not exist are removed.
//!
//! Repairs are written to every current backend and synced. The exit status is 0 when
//! nothing was wrong, 1 when problems were found and all of them repaired, and 2 when
//! damage is left (including everything found without `--repair`).
//!
//! fsck takes each backend's lock, so it refuses to run on a mounted filesystem.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::layout::{
    self, dirent_key, inode_key, DirentRecord, InodeRecord, KeyKind, Kind, Superblock, ROOT_INO,
    SUPERBLOCK_KEY,
};
use crate::mirror::wrap_store;
use crate::store::{object_keys, LockIntent, NamedStores, ObjectCopy, Store, StoreError};

/// Name of the directory (in the root) that receives orphaned inodes that still had links.
pub const LOST_FOUND: &[u8] = b"lost+found";

/// What fsck found and did.
#[derive(Debug, Default)]
pub struct Report {
    /// One line per problem or note, in the order found.
    pub lines: Vec<String>,
    pub found: usize,
    pub repaired: usize,
    pub objects: usize,
}

impl Report {
    fn problem(&mut self, repaired: bool, what: String) {
        self.found += 1;
        if repaired {
            self.repaired += 1;
            self.lines.push(format!("{what}: repaired"));
        } else {
            self.lines.push(what);
        }
    }

    /// The last line printed.
    pub fn summary(&self) -> String {
        match (self.found, self.found - self.repaired) {
            (0, _) => format!("clean: {} objects checked", self.objects),
            (n, 0) => format!(
                "{n} problem(s) found, all repaired ({} objects)",
                self.objects
            ),
            (n, left) => format!(
                "{n} problem(s) found, {left} not repaired ({} objects){}",
                self.objects,
                if self.repaired == 0 {
                    "; run with --repair to fix what can be fixed"
                } else {
                    ""
                }
            ),
        }
    }

    /// 0 clean, 1 everything found was repaired, 2 damage left.
    pub fn exit_code(&self) -> i32 {
        if self.found == 0 {
            0
        } else if self.repaired == self.found {
            1
        } else {
            2
        }
    }
}

struct Member {
    location: String,
    store: Arc<dyn Store>,
    sb: Superblock,
}

struct Checker {
    members: Vec<Member>,
    repair: bool,
    /// A data block with no good copy anywhere gets fresh checksums on the first backend
    /// (see [`repair_mounted`]).
    reseal_torn: bool,
    report: Report,
    block_size: u64,
    /// `/lost+found`, when this run created it.
    created_lost_found: Option<u64>,
}

/// Checks (and with `repair`, repairs) the backends of one filesystem.
pub fn run(stores: NamedStores, repair: bool) -> Result<Report, String> {
    let mut all = Vec::new();
    for (location, store) in stores {
        let raw = match store.get(SUPERBLOCK_KEY) {
            Ok(raw) => raw,
            Err(StoreError::NotFound) => {
                return Err(format!(
                    "{location} is not a mirrorfs backend (no superblock)"
                ))
            }
            Err(e) => return Err(format!("{location}: {e}")),
        };
        let sb = Superblock::decode(&raw).map_err(|e| format!("{location}: {e}"))?;
        all.push(Member {
            location,
            store,
            sb,
        });
    }
    let first = &all[0].sb;
    if let Some(m) = all.iter().find(|m| m.sb.fs_uuid != first.fs_uuid) {
        return Err(format!(
            "{} belongs to another filesystem than {}",
            m.location, all[0].location
        ));
    }
    let mut ids = BTreeSet::new();
    if let Some(m) = all.iter().find(|m| !ids.insert(m.sb.member_id)) {
        return Err(format!("{} is given twice", m.location));
    }
    let mut _locks = Vec::new();
    let intent = match repair {
        true => LockIntent::Write,
        false => LockIntent::Read,
    };
    for m in &all {
        match m.store.lock(intent) {
            Ok(Some(guard)) => _locks.push(guard),
            Ok(None) => {}
            Err(e) => return Err(format!("{}: {e}", m.location)),
        }
    }
    let newest = all
        .iter()
        .map(|m| m.sb.clone())
        .max_by_key(|sb| sb.generation)
        .expect("at least one backend");
    let mut report = Report::default();
    let mut members = Vec::new();
    for m in all {
        let recorded = newest.members.iter().find(|r| r.id == m.sb.member_id);
        let degraded = recorded.map_or("not a member", |r| r.degraded.as_str());
        if m.sb.generation < newest.generation || !degraded.is_empty() {
            report.lines.push(format!(
                "note: {} (member {}) is behind (generation {} of {}{}); it is left alone: \
                 mount the filesystem and recover it",
                m.location,
                m.sb.member_id,
                m.sb.generation,
                newest.generation,
                if degraded.is_empty() {
                    String::new()
                } else {
                    format!(", {degraded}")
                }
            ));
            continue;
        }
        let store = wrap_store(m.store, &newest);
        members.push(Member { store, ..m });
    }
    if members.is_empty() {
        return Err("no current backend among those given".into());
    }
    let mut checker = Checker {
        members,
        repair,
        reseal_torn: false,
        report,
        block_size: newest.block_size,
        created_lost_found: None,
    };
    let objects = checker.check_copies()?;
    checker.check_graph(objects)?;
    if repair && checker.report.repaired > 0 {
        for m in &checker.members {
            m.store
                .sync()
                .map_err(|e| format!("syncing {}: {e}", m.location))?;
        }
    }
    Ok(checker.report)
}

/// The repair a read-write mount runs when it finds the filesystem unclean and its journal
/// cannot be trusted (the machine rebooted, or no backend keeps one): both passes, repairing,
/// over `stores`, the mount's current backends as it wraps them (it holds their locks).
///
/// Unlike `fsck --repair`, a data block whose copies all fail their checksums is taken as
/// torn by the crash (power lost between a write's data and its checksum; the write was
/// never acknowledged, so old and new bytes are both acceptable): the first backend's bytes
/// get fresh checksums and are copied to the others.
pub fn repair_mounted(stores: Vec<(String, Arc<dyn Store>)>) -> Result<Report, String> {
    let mut members = Vec::new();
    for (location, store) in stores {
        let sb = store
            .get(SUPERBLOCK_KEY)
            .map_err(|e| e.to_string())
            .and_then(|raw| Superblock::decode(&raw).map_err(|e| e.to_string()))
            .map_err(|e| format!("{location}: reading the superblock: {e}"))?;
        members.push(Member {
            location,
            store,
            sb,
        });
    }
    let block_size = members.first().ok_or("no current backend")?.sb.block_size;
    let mut checker = Checker {
        members,
        repair: true,
        reseal_torn: true,
        report: Report::default(),
        block_size,
        created_lost_found: None,
    };
    let objects = checker.check_copies()?;
    checker.check_graph(objects)?;
    Ok(checker.report)
}

/// The good content of every object after pass 1: records in full, blocks by length.
#[derive(Default)]
struct Objects {
    records: BTreeMap<String, Vec<u8>>,
    blocks: BTreeMap<u64, Vec<(u64, u64, String)>>,
}

impl Checker {
    fn check_copies(&mut self) -> Result<Objects, String> {
        let keys = object_keys(
            self.members
                .iter()
                .map(|m| (m.location.as_str(), m.store.as_ref())),
        )?;
        self.report.objects = keys.len();
        let mut objects = Objects::default();
        for key in keys {
            let mut copies: Vec<ObjectCopy> = self
                .members
                .iter()
                .map(|m| ObjectCopy::read(m.store.as_ref(), &key))
                .collect();
            if self.reseal_torn
                && layout::key_kind(&key) == KeyKind::Block
                && copies.iter().all(|c| !matches!(c, ObjectCopy::Good(_)))
            {
                let first = &self.members[0];
                self.report.lines.push(format!(
                    "{key}: torn on every backend; kept the bytes of {}",
                    first.location
                ));
                copies[0] = ObjectCopy::resealed(first.store.as_ref(), &key);
            }
            let reference = copies.iter().position(|c| matches!(c, ObjectCopy::Good(_)));
            let Some(r) = reference else {
                for (m, c) in self.members.iter().zip(&copies) {
                    match c {
                        ObjectCopy::Bad(why) => self.report.problem(
                            false,
                            format!("{why} on {}, and no good copy exists", m.location),
                        ),
                        ObjectCopy::Failed(why) => self.report.problem(
                            false,
                            format!("{key}: cannot read on {}: {why}", m.location),
                        ),
                        _ => {}
                    }
                }
                continue;
            };
            let ObjectCopy::Good(data) = &copies[r] else {
                unreachable!("reference is a good copy")
            };
            for (i, c) in copies.iter().enumerate() {
                let what = match c {
                    ObjectCopy::Good(d) if d == data => continue,
                    ObjectCopy::Good(_) => format!(
                        "{key}: differs between {} and {}",
                        self.members[i].location, self.members[r].location
                    ),
                    ObjectCopy::Missing => format!(
                        "{key}: missing on {} (present on {})",
                        self.members[i].location, self.members[r].location
                    ),
                    ObjectCopy::Bad(why) => format!("{why} on {}", self.members[i].location),
                    ObjectCopy::Failed(why) => {
                        let m = &self.members[i].location;
                        self.report
                            .problem(false, format!("{key}: cannot read on {m}: {why}"));
                        continue;
                    }
                };
                let fixed = self.repair && self.members[i].store.put(&key, data).is_ok();
                self.report.problem(fixed, what);
            }
            match layout::key_kind(&key) {
                KeyKind::Block => {
                    if let Some((ino, index)) = block_of(&key) {
                        objects.blocks.entry(ino).or_default().push((
                            index,
                            data.len() as u64,
                            key.clone(),
                        ));
                    }
                }
                _ => {
                    objects.records.insert(key, data.clone());
                }
            }
        }
        Ok(objects)
    }

    /// Writes `data` at `key` on every current backend (when repairing).
    fn put_all(&self, key: &str, data: &[u8]) -> bool {
        self.repair && self.members.iter().all(|m| m.store.put(key, data).is_ok())
    }

    /// Deletes `key` on every current backend (when repairing).
    fn delete_all(&self, key: &str) -> bool {
        self.repair
            && self
                .members
                .iter()
                .all(|m| matches!(m.store.delete(key), Ok(()) | Err(StoreError::NotFound)))
    }

    fn check_graph(&mut self, objects: Objects) -> Result<(), String> {
        let mut inodes: BTreeMap<u64, InodeRecord> = BTreeMap::new();
        let mut entries: Vec<(String, u64, DirentRecord)> = Vec::new();
        for (key, data) in &objects.records {
            if key.starts_with("i/") {
                match InodeRecord::decode(data) {
                    Ok(rec) => {
                        inodes.insert(rec.ino, rec);
                    }
                    Err(e) => self
                        .report
                        .problem(false, format!("{key}: unreadable inode record: {e}")),
                }
            } else if let Some(parent) = dirent_parent(key) {
                match DirentRecord::decode(data) {
                    Ok(d) => entries.push((key.clone(), parent, d)),
                    Err(e) => {
                        let fixed = self.delete_all(key);
                        self.report
                            .problem(fixed, format!("{key}: unreadable directory entry: {e}"));
                    }
                }
            }
        }
        if !inodes.contains_key(&ROOT_INO) {
            self.report
                .problem(false, "the root directory's inode is missing".into());
            return Ok(());
        }

        // Entries: in an existing directory, naming an existing inode of the right kind.
        let mut refs: BTreeMap<u64, u32> = BTreeMap::new();
        let mut subdirs: BTreeMap<u64, u32> = BTreeMap::new();
        let mut named_in: BTreeMap<u64, u64> = BTreeMap::new();
        for (key, parent, entry) in &entries {
            let name = String::from_utf8_lossy(&entry.name).into_owned();
            if inodes.get(parent).map(|p| p.kind) != Some(Kind::Dir) {
                let fixed = self.delete_all(key);
                self.report.problem(
                    fixed,
                    format!("entry {name:?} is in directory {parent:#x}, which does not exist"),
                );
                continue;
            }
            let Some(target) = inodes.get(&entry.ino) else {
                let fixed = self.delete_all(key);
                self.report.problem(
                    fixed,
                    format!(
                        "entry {name:?} in directory {parent:#x} points at inode {:#x}, \
                         which does not exist",
                        entry.ino
                    ),
                );
                continue;
            };
            if target.kind != entry.kind {
                let fixed = self.put_all(
                    key,
                    &DirentRecord {
                        kind: target.kind,
                        ..entry.clone()
                    }
                    .encode(),
                );
                self.report.problem(
                    fixed,
                    format!("entry {name:?} in directory {parent:#x} has the wrong kind"),
                );
            }
            *refs.entry(entry.ino).or_default() += 1;
            named_in.insert(entry.ino, *parent);
            if target.kind == Kind::Dir {
                *subdirs.entry(*parent).or_default() += 1;
            }
        }

        // Orphans: inodes no entry names.
        let orphans: Vec<u64> = inodes
            .keys()
            .copied()
            .filter(|&ino| ino != ROOT_INO && !refs.contains_key(&ino))
            .collect();
        let mut lost_found = None;
        for ino in orphans {
            let rec = inodes[&ino].clone();
            if rec.nlink == 0 {
                let fixed = self.destroy(&rec, &objects);
                self.report.problem(
                    fixed,
                    format!("inode {ino:#x} is not in any directory and has no links left"),
                );
                inodes.remove(&ino);
                continue;
            }
            let fixed = match self.lost_found(&mut lost_found, &mut inodes) {
                Some(lf) => self.adopt(lf, &rec, &mut inodes),
                None => false,
            };
            self.report.problem(
                fixed,
                format!(
                    "inode {ino:#x} ({:?}) is not in any directory{}",
                    rec.kind,
                    if fixed { ", moved to /lost+found" } else { "" }
                ),
            );
            if fixed {
                *refs.entry(ino).or_default() += 1;
                named_in.insert(ino, lost_found.expect("adopted"));
                if rec.kind == Kind::Dir {
                    *subdirs.entry(lost_found.expect("adopted")).or_default() += 1;
                }
            }
        }

        if let Some(lf) = self.created_lost_found {
            refs.insert(lf, 1);
            named_in.insert(lf, ROOT_INO);
            *subdirs.entry(ROOT_INO).or_default() += 1;
        }

        // Link counts, sizes and block high-water marks.
        let inos: Vec<u64> = inodes.keys().copied().collect();
        for ino in inos {
            let mut rec = inodes[&ino].clone();
            let mut wrong = Vec::new();
            let want_links = if rec.kind == Kind::Dir {
                2 + subdirs.get(&ino).copied().unwrap_or(0)
            } else {
                refs.get(&ino).copied().unwrap_or(0)
            };
            if rec.nlink != want_links {
                wrong.push(format!("link count {} should be {want_links}", rec.nlink));
                rec.nlink = want_links;
            }
            if rec.kind == Kind::Dir && ino != ROOT_INO {
                if let Some(&parent) = named_in.get(&ino) {
                    if rec.parent != parent {
                        wrong.push(format!("parent {:#x} should be {parent:#x}", rec.parent));
                        rec.parent = parent;
                    }
                }
            }
            if let Some(blocks) = objects.blocks.get(&ino) {
                if rec.kind == Kind::File {
                    let end = blocks
                        .iter()
                        .map(|(i, len, _)| i * self.block_size + len)
                        .max()
                        .unwrap_or(0);
                    if end > rec.size {
                        wrong.push(format!(
                            "size {} is smaller than its data ({end})",
                            rec.size
                        ));
                        rec.size = end;
                    }
                    let top = blocks.iter().map(|(i, _, _)| *i).max().unwrap_or(0);
                    if top >= rec.blocks_hw {
                        wrong.push(format!("block {top} is above the high-water mark"));
                        rec.blocks_hw = (top + 1).next_power_of_two();
                    }
                }
            }
            if !wrong.is_empty() {
                let fixed = self.put_all(&inode_key(ino), &rec.encode());
                self.report
                    .problem(fixed, format!("inode {ino:#x}: {}", wrong.join(", ")));
            }
        }

        // Data of inodes that do not exist, or that are not files.
        for (ino, blocks) in &objects.blocks {
            if inodes.get(ino).is_some_and(|r| r.kind == Kind::File) {
                continue;
            }
            for (_, _, key) in blocks {
                let fixed = self.delete_all(key);
                self.report.problem(
                    fixed,
                    format!("{key}: data of inode {ino:#x}, which has none"),
                );
            }
        }
        Ok(())
    }

    /// Removes an inode and its data everywhere.
    fn destroy(&self, rec: &InodeRecord, objects: &Objects) -> bool {
        let mut ok = self.delete_all(&inode_key(rec.ino));
        for (_, _, key) in objects.blocks.get(&rec.ino).into_iter().flatten() {
            ok &= self.delete_all(key);
        }
        ok
    }

    /// The inode of `/lost+found`, created when needed (only when repairing).
    fn lost_found(
        &mut self,
        cached: &mut Option<u64>,
        inodes: &mut BTreeMap<u64, InodeRecord>,
    ) -> Option<u64> {
        if cached.is_some() || !self.repair {
            return *cached;
        }
        let key = dirent_key(ROOT_INO, LOST_FOUND);
        let existing = self.members[0]
            .store
            .get(&key)
            .ok()
            .and_then(|d| DirentRecord::decode(&d).ok())
            .filter(|d| inodes.get(&d.ino).is_some_and(|r| r.kind == Kind::Dir));
        if let Some(d) = existing {
            *cached = Some(d.ino);
            return *cached;
        }
        let ino = self.alloc_ino(inodes)?;
        let root = inodes.get(&ROOT_INO)?.clone();
        let mut rec = InodeRecord::new(ino, Kind::Dir, 0o700, root.uid, root.gid);
        rec.parent = ROOT_INO;
        let entry = DirentRecord {
            name: LOST_FOUND.to_vec(),
            ino,
            kind: Kind::Dir,
        };
        if !(self.put_all(&inode_key(ino), &rec.encode()) && self.put_all(&key, &entry.encode())) {
            return None;
        }
        inodes.insert(ino, rec);
        self.created_lost_found = Some(ino);
        self.report
            .lines
            .push(format!("created /lost+found (inode {ino:#x})"));
        *cached = Some(ino);
        *cached
    }

    /// An inode number no inode uses, reserved in every current superblock.
    fn alloc_ino(&self, inodes: &BTreeMap<u64, InodeRecord>) -> Option<u64> {
        let highest = inodes.keys().next_back().copied().unwrap_or(ROOT_INO);
        let ino = self.members[0].sb.next_ino.max(highest + 1);
        for m in &self.members {
            let mut sb = m.sb.clone();
            sb.next_ino = sb.next_ino.max(ino + 1);
            m.store.put(SUPERBLOCK_KEY, &sb.encode()).ok()?;
        }
        Some(ino)
    }

    /// Links an orphan into `lost+found` as `#<ino>`.
    fn adopt(&self, lf: u64, rec: &InodeRecord, inodes: &mut BTreeMap<u64, InodeRecord>) -> bool {
        let name = format!("#{:x}", rec.ino).into_bytes();
        let entry = DirentRecord {
            name: name.clone(),
            ino: rec.ino,
            kind: rec.kind,
        };
        let mut ok = self.put_all(&dirent_key(lf, &name), &entry.encode());
        if ok && rec.kind == Kind::Dir {
            let mut moved = rec.clone();
            moved.parent = lf;
            ok = self.put_all(&inode_key(rec.ino), &moved.encode());
            inodes.insert(rec.ino, moved);
        }
        ok
    }
}

/// The directory a directory-entry key belongs to.
fn dirent_parent(key: &str) -> Option<u64> {
    let rest = key.strip_prefix("d/")?;
    let mut parts = rest.split('/');
    parts.next()?;
    u64::from_str_radix(parts.next()?, 16).ok()
}

/// The inode and index of a data block key.
fn block_of(key: &str) -> Option<(u64, u64)> {
    let name = key.strip_prefix("b/")?.split('/').nth(1)?;
    let (ino, index) = name.split_once('.')?;
    Some((
        u64::from_str_radix(ino, 16).ok()?,
        u64::from_str_radix(index, 16).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse() {
        assert_eq!(block_of(&layout::block_key(0x1f3, 9)), Some((0x1f3, 9)));
        assert_eq!(dirent_parent(&dirent_key(0x44, b"n")), Some(0x44));
        assert_eq!(dirent_parent(&inode_key(3)), None);
    }
}
