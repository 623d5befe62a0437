//! The fs layer: POSIX semantics over the objects of [`crate::layout`].
//!
//! It knows nothing of FUSE: every operation takes plain arguments and returns
//! [`FsResult`], so it can be driven without a kernel (see the tests against
//! [`crate::store::MemoryStore`]). Each operation turns into one [`Batch`] of object mutations
//! handed to the [`Mirror`]; memory is only updated once the mirror has acknowledged the
//! batch, so a failed operation changes nothing.
//!
//! # Caching
//!
//! The mount owns its backends, so what it has read stays true: inodes and directory listings
//! are loaded on first use and kept in memory for the life of the mount (they are never
//! evicted; memory grows with the number of inodes touched — a known shortcoming for trees
//! of many millions of files).
//!
//! # Concurrency
//!
//! - `ns` serialises namespace changes (create, link, unlink, rename, ...). Namespace
//!   operations on different directories therefore do not run in parallel; data operations
//!   never take it.
//! - Each inode has its own mutex, held across the mirror call of any operation that
//!   changes the inode (so a write and a truncate of one file never interleave). Data
//!   operations hold one inode lock at a time; namespace operations may hold several, always
//!   under `ns`, so no cycle can form.
//! - Reads take the inode lock only to read the size, then read blocks without it.
//! - The `DashMap`s are only used to find an `Arc`; no map guard is held while another map
//!   access or any I/O happens (a guard held across an access to the same map deadlocks).
//!
//! # Ordering of mutations within a batch (crash safety)
//!
//! Every operation is one batch, and the mirror's crash journal redoes a batch cut short by
//! a crash of the mount process, so each operation is all-or-nothing on every backend (see
//! [`crate::mirror::journal`]). That relies on this layer holding the locks of everything a
//! batch changes until the mirror acknowledges it. Within a batch, new objects are still
//! written before the entry that links them, and entries removed before the objects they
//! point to, so that without the journal (after a power loss) a crash leaves at worst an
//! unreferenced object or a link count that is too high, never an entry pointing at nothing.
//! File sizes and times changed by `write` are kept in memory and written with the inode at
//! `flush`, `fsync`, `release`, unmount, or by the writeback thread within
//! [`WRITEBACK_INTERVAL`]; after a crash of the mount process, the repair raises the size of
//! every file written lately to cover its data.

mod error;

pub use error::{FsError, FsResult};

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use log::{debug, error};
use parking_lot::{Mutex, MutexGuard, RwLock};

use crate::layout::{
    block_key, block_prefix, dirent_key, inode_key, DirentRecord, InodeRecord, Kind, Timestamp,
    ROOT_INO,
};
use crate::mirror::{Batch, Mirror, MirrorError, Mutation};

/// Longest name of a directory entry, in bytes.
pub const NAME_MAX: usize = 255;

/// Largest file size accepted (as ext4 with 4 KiB blocks).
pub const MAX_FILE_SIZE: u64 = 16 << 40;

/// Largest extended attribute value accepted.
pub const XATTR_SIZE_MAX: usize = 64 * 1024;

/// Who performs an operation (from the kernel request).
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// A time to set in `setattr`.
#[derive(Clone, Copy, Debug)]
pub enum TimeSet {
    Now,
    At(Timestamp),
}

/// The attributes `setattr` may change; `None` leaves one alone.
#[derive(Clone, Copy, Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
    pub ctime: Option<Timestamp>,
}

/// One entry of a directory listing.
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: u64,
    pub kind: Kind,
}

/// `renameat2` flags.
#[derive(Clone, Copy, Debug, Default)]
pub struct RenameFlags {
    pub noreplace: bool,
    pub exchange: bool,
}

/// What `statfs` reports.
#[derive(Clone, Copy, Debug)]
pub struct FsStats {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub files: u64,
}

struct NodeState {
    rec: InodeRecord,
    /// `rec` has changes (size, times) not yet written to the backends.
    dirty: bool,
    /// Open file handles.
    open: u32,
}

/// An inode in memory.
struct Node {
    state: Mutex<NodeState>,
}

/// Entries of one directory, by name.
type DirMap = BTreeMap<Vec<u8>, (u64, Kind)>;

/// An open file or directory.
struct Handle {
    ino: u64,
    append: bool,
    /// Snapshot of a directory taken at opendir, so offsets stay stable.
    listing: Option<Arc<Vec<DirEntry>>>,
}

/// The filesystem.
pub struct Fs {
    mirror: Arc<Mirror>,
    block_size: u64,
    nodes: DashMap<u64, Arc<Node>>,
    dirs: DashMap<u64, Arc<RwLock<DirMap>>>,
    ns: Mutex<()>,
    handles: DashMap<u64, Handle>,
    next_fh: AtomicU64,
    /// Inodes whose record changed in memory but not on the backends.
    dirty: Mutex<HashSet<u64>>,
    /// Held while dirty inodes are written back; `true` once the filesystem is shut down,
    /// after which nothing is written.
    closed: Mutex<bool>,
}

/// How often inodes with unwritten times and sizes are written back.
pub const WRITEBACK_INTERVAL: Duration = Duration::from_secs(1);

fn persist(rec: &InodeRecord) -> Mutation {
    Mutation::Rewrite {
        key: inode_key(rec.ino),
        data: rec.encode().into(),
    }
}

fn check_name(name: &[u8]) -> FsResult<()> {
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
        return Err(FsError::Invalid);
    }
    Ok(())
}

/// Locks distinct nodes in ascending inode order (callers hold `ns`).
fn lock_all<'a>(nodes: &'a [(u64, Arc<Node>)]) -> Vec<(u64, MutexGuard<'a, NodeState>)> {
    let mut sorted: Vec<&(u64, Arc<Node>)> = nodes.iter().collect();
    sorted.sort_by_key(|(ino, _)| *ino);
    sorted.dedup_by_key(|(ino, _)| *ino);
    sorted
        .into_iter()
        .map(|(ino, n)| (*ino, n.state.lock()))
        .collect()
}

fn guard_of<'g, 'a>(
    guards: &'g mut [(u64, MutexGuard<'a, NodeState>)],
    ino: u64,
) -> &'g mut NodeState {
    let (_, g) = guards
        .iter_mut()
        .find(|(i, _)| *i == ino)
        .expect("node locked");
    g
}

impl Fs {
    /// Opens the filesystem held by `mirror`.
    pub fn new(mirror: Arc<Mirror>) -> FsResult<Fs> {
        let block_size = mirror.block_size();
        let fs = Fs {
            mirror,
            block_size,
            nodes: DashMap::new(),
            dirs: DashMap::new(),
            ns: Mutex::new(()),
            handles: DashMap::new(),
            next_fh: AtomicU64::new(1),
            dirty: Mutex::new(HashSet::new()),
            closed: Mutex::new(false),
        };
        fs.node(ROOT_INO)?;
        Ok(fs)
    }

    /// Starts the thread that writes back dirty inodes every [`WRITEBACK_INTERVAL`]; it ends
    /// when the filesystem is shut down or dropped.
    pub fn start_writeback(fs: &Arc<Fs>) {
        let weak = Arc::downgrade(fs);
        let spawned = std::thread::Builder::new()
            .name("writeback".into())
            .spawn(move || loop {
                std::thread::sleep(WRITEBACK_INTERVAL);
                let Some(fs) = weak.upgrade() else { return };
                let closed = fs.closed.lock();
                if *closed {
                    return;
                }
                if let Err(e) = fs.write_back_dirty() {
                    error!("writing back inodes failed: {e}");
                }
            });
        if let Err(e) = spawned {
            error!("cannot start the writeback thread: {e}");
        }
    }

    /// Marks (or clears) unwritten changes of a locked node.
    fn set_dirty(&self, ino: u64, st: &mut NodeState, dirty: bool) {
        st.dirty = dirty;
        if dirty {
            self.dirty.lock().insert(ino);
        }
    }

    /// Writes back every inode whose record changed only in memory.
    fn write_back_dirty(&self) -> FsResult<()> {
        let inos: Vec<u64> = self.dirty.lock().drain().collect();
        for (i, &ino) in inos.iter().enumerate() {
            let Some(node) = self.nodes.get(&ino).map(|n| Arc::clone(&n)) else {
                continue;
            };
            let mut st = node.state.lock();
            let gone = st.rec.nlink == 0 && st.open == 0;
            if st.dirty && !gone {
                if let Err(e) = self.mirror.apply(vec![persist(&st.rec)]) {
                    // Keep what is still unwritten for the next attempt.
                    self.dirty.lock().extend(&inos[i..]);
                    return Err(e.into());
                }
            }
            st.dirty = false;
        }
        Ok(())
    }

    /// The mirror below this filesystem.
    pub fn mirror(&self) -> &Arc<Mirror> {
        &self.mirror
    }

    /// Builds the objects of an empty filesystem: the root directory.
    pub fn root_batch(uid: u32, gid: u32) -> Batch {
        let mut root = InodeRecord::new(ROOT_INO, Kind::Dir, 0o755, uid, gid);
        root.parent = ROOT_INO;
        vec![persist(&root)]
    }

    fn write_guard(&self) -> FsResult<()> {
        if self.mirror.read_only() {
            return Err(FsError::ReadOnly);
        }
        Ok(())
    }

    // ----- loading -------------------------------------------------------------------------

    fn node(&self, ino: u64) -> FsResult<Arc<Node>> {
        self.load_node(ino, true)
    }

    /// The cached inode, loaded first when needed; `heal` repairs bad copies of its record
    /// on the way (scrub loads without, because it repairs and counts them itself).
    fn load_node(&self, ino: u64, heal: bool) -> FsResult<Arc<Node>> {
        if let Some(n) = self.nodes.get(&ino) {
            return Ok(Arc::clone(&n));
        }
        let key = inode_key(ino);
        let data = if heal {
            self.mirror.get(&key)?
        } else {
            self.mirror.get_unhealed(&key)?
        };
        let rec = InodeRecord::decode(&data).map_err(|e| {
            error!("inode {ino:#x} is unreadable: {e}");
            FsError::Corrupt(inode_key(ino))
        })?;
        let node = Arc::new(Node {
            state: Mutex::new(NodeState {
                rec,
                dirty: false,
                open: 0,
            }),
        });
        Ok(Arc::clone(&self.nodes.entry(ino).or_insert(node)))
    }

    fn dir(&self, ino: u64) -> FsResult<Arc<RwLock<DirMap>>> {
        if let Some(d) = self.dirs.get(&ino) {
            return Ok(Arc::clone(&d));
        }
        if self.node(ino)?.state.lock().rec.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        let prefix = crate::layout::dir_prefix(ino);
        let (mut raw, bad) = self.mirror.read(move |s| {
            let keys = s.list(&prefix)?;
            let mut out = Vec::with_capacity(keys.len());
            let mut bad = Vec::new();
            for key in keys {
                match s.get(&key) {
                    Ok(data) => out.push((key, data)),
                    Err(crate::store::StoreError::NotFound) => {}
                    Err(crate::store::StoreError::Corrupt(_)) => bad.push(key),
                    Err(e) => return Err(e),
                }
            }
            Ok((out, bad))
        })?;
        // Entries whose copy on that backend failed its checksum: read (and repair) each.
        for key in bad {
            match self.mirror.get(&key) {
                Ok(data) => raw.push((key, data)),
                Err(MirrorError::NotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let mut map = DirMap::new();
        for (key, data) in raw {
            match DirentRecord::decode(&data) {
                Ok(d) => {
                    map.insert(d.name, (d.ino, d.kind));
                }
                Err(e) => error!("directory entry {key} is unreadable, skipped: {e}"),
            }
        }
        let dir = Arc::new(RwLock::new(map));
        Ok(Arc::clone(&self.dirs.entry(ino).or_insert(dir)))
    }

    /// Makes the mirror's scrub and recovery read each key under the lock that excludes
    /// writes to it: the namespace lock for directory entries, the inode's lock for its
    /// record and data.
    pub fn install_key_locker(fs: &Arc<Fs>) {
        let weak = Arc::downgrade(fs);
        fs.mirror
            .set_key_locker(Arc::new(move |key: &str, f: &mut dyn FnMut()| {
                match weak.upgrade() {
                    Some(fs) => fs.with_key_locked(key, f),
                    None => f(),
                }
            }));
    }

    fn with_key_locked(&self, key: &str, f: &mut dyn FnMut()) {
        if key.starts_with("d/") {
            let _ns = self.ns.lock();
            return f();
        }
        if let Some(ino) = crate::layout::key_ino(key) {
            // An inode that cannot be loaded does not exist, so nothing writes to it.
            if let Ok(node) = self.load_node(ino, false) {
                let _st = node.state.lock();
                return f();
            }
        }
        f()
    }

    /// The attributes of `ino`.
    pub fn getattr(&self, ino: u64) -> FsResult<InodeRecord> {
        Ok(self.node(ino)?.state.lock().rec.clone())
    }

    /// Finds `name` in directory `parent`.
    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<InodeRecord> {
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        let dir = self.dir(parent)?;
        let found = dir.read().get(name).map(|(ino, _)| *ino);
        match found {
            Some(ino) => self.getattr(ino),
            None => Err(FsError::NotFound),
        }
    }

    // ----- creation ------------------------------------------------------------------------

    /// Creates a regular file, FIFO, socket or device node.
    pub fn mknod(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        rdev: u32,
    ) -> FsResult<InodeRecord> {
        let kind = Kind::from_mode(mode).ok_or(FsError::Invalid)?;
        if kind == Kind::Dir || kind == Kind::Symlink {
            return Err(FsError::Invalid);
        }
        self.create_node(caller, parent, name, kind, mode, |rec| rec.rdev = rdev)
    }

    /// Creates a directory.
    pub fn mkdir(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
    ) -> FsResult<InodeRecord> {
        self.create_node(caller, parent, name, Kind::Dir, mode, |rec| {
            rec.parent = parent
        })
    }

    /// Creates a symbolic link to `target`.
    pub fn symlink(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        target: &[u8],
    ) -> FsResult<InodeRecord> {
        if target.len() > 4095 {
            return Err(FsError::NameTooLong);
        }
        self.create_node(caller, parent, name, Kind::Symlink, 0o777, |rec| {
            rec.target = Some(target.to_vec());
            rec.size = target.len() as u64;
        })
    }

    /// Creates a regular file and opens it.
    pub fn create(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        mode: u32,
        flags: i32,
    ) -> FsResult<(InodeRecord, u64)> {
        let rec = self.create_node(caller, parent, name, Kind::File, mode, |_| {})?;
        let fh = self.open(rec.ino, flags)?;
        Ok((rec, fh))
    }

    fn create_node(
        &self,
        caller: Caller,
        parent: u64,
        name: &[u8],
        kind: Kind,
        mode: u32,
        init: impl FnOnce(&mut InodeRecord),
    ) -> FsResult<InodeRecord> {
        self.write_guard()?;
        check_name(name)?;
        let _ns = self.ns.lock();
        let dir = self.dir(parent)?;
        if dir.read().contains_key(name) {
            return Err(FsError::Exists);
        }
        let parent_node = self.node(parent)?;
        let mut pst = parent_node.state.lock();
        if pst.rec.nlink == 0 {
            return Err(FsError::NotFound);
        }

        let ino = self.mirror.alloc_ino()?;
        let mut rec = InodeRecord::new(ino, kind, mode & 0o7777, caller.uid, caller.gid);
        if pst.rec.perm & libc::S_ISGID != 0 {
            // BSD group semantics in a set-group-id directory, as Linux does.
            rec.gid = pst.rec.gid;
            if kind == Kind::Dir {
                rec.perm |= libc::S_ISGID;
            }
        }
        if kind == Kind::File {
            rec.blocks_hw = 1;
        }
        init(&mut rec);

        let mut prec = pst.rec.clone();
        prec.mtime = rec.ctime;
        prec.ctime = rec.ctime;
        let entry = DirentRecord {
            name: name.to_vec(),
            ino,
            kind,
        };
        let mut batch = vec![
            Mutation::Create {
                key: inode_key(ino),
                data: rec.encode().into(),
            },
            Mutation::Create {
                key: dirent_key(parent, name),
                data: entry.encode().into(),
            },
        ];
        if kind == Kind::Dir {
            prec.nlink += 1;
        }
        batch.push(persist(&prec));
        self.mirror.apply(batch)?;

        pst.rec = prec;
        self.set_dirty(parent, &mut pst, false);
        drop(pst);
        let node = Arc::new(Node {
            state: Mutex::new(NodeState {
                rec: rec.clone(),
                dirty: false,
                open: 0,
            }),
        });
        self.nodes.insert(ino, node);
        if kind == Kind::Dir {
            self.dirs.insert(ino, Arc::new(RwLock::new(DirMap::new())));
        }
        dir.write().insert(name.to_vec(), (ino, kind));
        debug!("created {kind:?} {ino:#x} in {parent:#x}");
        Ok(rec)
    }

    /// Adds a hard link to `ino` as `name` in `parent`.
    pub fn link(&self, ino: u64, parent: u64, name: &[u8]) -> FsResult<InodeRecord> {
        self.write_guard()?;
        check_name(name)?;
        let _ns = self.ns.lock();
        let dir = self.dir(parent)?;
        if dir.read().contains_key(name) {
            return Err(FsError::Exists);
        }
        let nodes = [(ino, self.node(ino)?), (parent, self.node(parent)?)];
        let mut guards = lock_all(&nodes);
        let mut rec = guard_of(&mut guards, ino).rec.clone();
        if rec.kind == Kind::Dir {
            return Err(FsError::NotPermitted);
        }
        if rec.nlink == 0 {
            return Err(FsError::NotFound);
        }
        if rec.nlink >= 65000 {
            return Err(FsError::TooManyLinks);
        }
        let now = Timestamp::now();
        rec.nlink += 1;
        rec.ctime = now;
        let mut prec = guard_of(&mut guards, parent).rec.clone();
        prec.mtime = now;
        prec.ctime = now;
        let entry = DirentRecord {
            name: name.to_vec(),
            ino,
            kind: rec.kind,
        };
        self.mirror.apply(vec![
            Mutation::Create {
                key: dirent_key(parent, name),
                data: entry.encode().into(),
            },
            persist(&rec),
            persist(&prec),
        ])?;
        let st = guard_of(&mut guards, ino);
        st.rec = rec.clone();
        st.dirty = false;
        let pst = guard_of(&mut guards, parent);
        pst.rec = prec;
        self.set_dirty(parent, pst, false);
        dir.write().insert(name.to_vec(), (ino, rec.kind));
        Ok(rec)
    }

    // ----- removal -------------------------------------------------------------------------

    /// Removes a non-directory entry.
    pub fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.remove(parent, name, false)
    }

    /// Removes an empty directory.
    pub fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.remove(parent, name, true)
    }

    fn remove(&self, parent: u64, name: &[u8], want_dir: bool) -> FsResult<()> {
        self.write_guard()?;
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        let _ns = self.ns.lock();
        let dir = self.dir(parent)?;
        let (ino, kind) = dir.read().get(name).copied().ok_or(FsError::NotFound)?;
        if want_dir && kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        if !want_dir && kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        if want_dir && !self.dir(ino)?.read().is_empty() {
            return Err(FsError::NotEmpty);
        }
        let nodes = [(ino, self.node(ino)?), (parent, self.node(parent)?)];
        let mut guards = lock_all(&nodes);
        let now = Timestamp::now();

        let mut batch = vec![Mutation::Delete {
            key: dirent_key(parent, name),
        }];
        let mut prec = guard_of(&mut guards, parent).rec.clone();
        prec.mtime = now;
        prec.ctime = now;
        let st = guard_of(&mut guards, ino);
        let mut rec = st.rec.clone();
        if kind == Kind::Dir {
            prec.nlink -= 1;
            rec.nlink = 0;
        } else {
            rec.nlink = rec.nlink.saturating_sub(1);
        }
        rec.ctime = now;
        batch.extend(self.unlinked_node_mutations(&rec, st.open));
        batch.push(persist(&prec));
        self.mirror.apply(batch)?;

        let st = guard_of(&mut guards, ino);
        st.rec = rec;
        st.dirty = false;
        let pst = guard_of(&mut guards, parent);
        pst.rec = prec;
        self.set_dirty(parent, pst, false);
        drop(guards);
        dir.write().remove(name);
        if kind == Kind::Dir {
            self.dirs.remove(&ino);
        }
        Ok(())
    }

    /// What happens to an inode that just lost a link: written back while it has links or
    /// open handles, removed with its data otherwise.
    fn unlinked_node_mutations(&self, rec: &InodeRecord, open: u32) -> Vec<Mutation> {
        if rec.nlink > 0 || open > 0 {
            return vec![persist(rec)];
        }
        self.destroy_mutations(rec)
    }

    fn destroy_mutations(&self, rec: &InodeRecord) -> Vec<Mutation> {
        let ino = rec.ino;
        vec![
            Mutation::Delete {
                key: inode_key(ino),
            },
            Mutation::TrimBlocks {
                ino,
                from: 0,
                to: rec.blocks_hw,
            },
        ]
    }

    // ----- rename --------------------------------------------------------------------------

    /// Renames `parent/name` to `newparent/newname`, as `renameat2`.
    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        flags: RenameFlags,
    ) -> FsResult<()> {
        self.write_guard()?;
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        check_name(newname)?;
        if flags.exchange && flags.noreplace {
            return Err(FsError::Invalid);
        }
        let _ns = self.ns.lock();
        let src_dir = self.dir(parent)?;
        let dst_dir = self.dir(newparent)?;
        let (ino, kind) = src_dir.read().get(name).copied().ok_or(FsError::NotFound)?;
        let target = dst_dir.read().get(newname).copied();

        if flags.exchange {
            let (tino, tkind) = target.ok_or(FsError::NotFound)?;
            return self.exchange(parent, name, (ino, kind), newparent, newname, (tino, tkind));
        }
        if let Some((tino, tkind)) = target {
            if flags.noreplace {
                return Err(FsError::Exists);
            }
            if tino == ino {
                // Two links to one inode: POSIX says rename does nothing.
                return Ok(());
            }
            match (kind == Kind::Dir, tkind == Kind::Dir) {
                (true, false) => return Err(FsError::NotDir),
                (false, true) => return Err(FsError::IsDir),
                (true, true) if !self.dir(tino)?.read().is_empty() => {
                    return Err(FsError::NotEmpty)
                }
                _ => {}
            }
        }
        if kind == Kind::Dir {
            self.check_not_ancestor(ino, newparent)?;
        }

        let mut nodes = vec![(ino, self.node(ino)?), (parent, self.node(parent)?)];
        nodes.push((newparent, self.node(newparent)?));
        if let Some((tino, _)) = target {
            nodes.push((tino, self.node(tino)?));
        }
        let mut guards = lock_all(&nodes);
        let now = Timestamp::now();

        let mut rec = guard_of(&mut guards, ino).rec.clone();
        rec.ctime = now;
        if kind == Kind::Dir {
            rec.parent = newparent;
        }
        let mut prec = guard_of(&mut guards, parent).rec.clone();
        prec.mtime = now;
        prec.ctime = now;
        let mut nprec = if newparent == parent {
            None
        } else {
            let mut r = guard_of(&mut guards, newparent).rec.clone();
            r.mtime = now;
            r.ctime = now;
            Some(r)
        };
        if kind == Kind::Dir {
            if let Some(np) = nprec.as_mut() {
                prec.nlink -= 1;
                np.nlink += 1;
            }
        }

        let entry = DirentRecord {
            name: newname.to_vec(),
            ino,
            kind,
        };
        let mut batch = vec![
            Mutation::Put {
                key: dirent_key(newparent, newname),
                data: entry.encode().into(),
            },
            Mutation::Delete {
                key: dirent_key(parent, name),
            },
            persist(&rec),
        ];
        let mut trec = None;
        if let Some((tino, tkind)) = target {
            let tst = guard_of(&mut guards, tino);
            let mut t = tst.rec.clone();
            t.ctime = now;
            if tkind == Kind::Dir {
                t.nlink = 0;
                match nprec.as_mut() {
                    Some(np) => np.nlink -= 1,
                    None => prec.nlink -= 1,
                }
            } else {
                t.nlink = t.nlink.saturating_sub(1);
            }
            batch.extend(self.unlinked_node_mutations(&t, tst.open));
            trec = Some(t);
        }
        batch.push(persist(&prec));
        if let Some(np) = &nprec {
            batch.push(persist(np));
        }
        self.mirror.apply(batch)?;

        let commit = |guards: &mut [(u64, MutexGuard<NodeState>)], r: InodeRecord| {
            let st = guard_of(guards, r.ino);
            st.rec = r;
            st.dirty = false;
        };
        commit(&mut guards, rec);
        commit(&mut guards, prec);
        if let Some(np) = nprec {
            commit(&mut guards, np);
        }
        if let Some(t) = trec {
            commit(&mut guards, t);
        }
        drop(guards);
        src_dir.write().remove(name);
        dst_dir.write().insert(newname.to_vec(), (ino, kind));
        if let Some((tino, Kind::Dir)) = target {
            self.dirs.remove(&tino);
        }
        Ok(())
    }

    /// Fails with EINVAL when `newparent` is `dir` or lies below it.
    fn check_not_ancestor(&self, dir: u64, newparent: u64) -> FsResult<()> {
        let mut cur = newparent;
        loop {
            if cur == dir {
                return Err(FsError::Invalid);
            }
            if cur == ROOT_INO {
                return Ok(());
            }
            let next = self.node(cur)?.state.lock().rec.parent;
            if next == cur || next == 0 {
                return Ok(());
            }
            cur = next;
        }
    }

    fn exchange(
        &self,
        parent: u64,
        name: &[u8],
        (ino, kind): (u64, Kind),
        newparent: u64,
        newname: &[u8],
        (tino, tkind): (u64, Kind),
    ) -> FsResult<()> {
        if ino == tino {
            return Ok(());
        }
        if kind == Kind::Dir {
            self.check_not_ancestor(ino, newparent)?;
        }
        if tkind == Kind::Dir {
            self.check_not_ancestor(tino, parent)?;
        }
        let nodes = [
            (ino, self.node(ino)?),
            (tino, self.node(tino)?),
            (parent, self.node(parent)?),
            (newparent, self.node(newparent)?),
        ];
        let mut guards = lock_all(&nodes);
        let now = Timestamp::now();
        let mut recs: BTreeMap<u64, InodeRecord> = BTreeMap::new();
        for i in [ino, tino, parent, newparent] {
            let mut r = guard_of(&mut guards, i).rec.clone();
            r.ctime = now;
            recs.insert(i, r);
        }
        for p in [parent, newparent] {
            recs.get_mut(&p).expect("parent").mtime = now;
        }
        if parent != newparent {
            recs.get_mut(&ino).expect("src").parent = newparent;
            recs.get_mut(&tino).expect("dst").parent = parent;
            let moved_dirs = |k: Kind| i64::from(k == Kind::Dir);
            let delta = moved_dirs(tkind) - moved_dirs(kind);
            let p = recs.get_mut(&parent).expect("parent");
            p.nlink = (i64::from(p.nlink) + delta) as u32;
            let np = recs.get_mut(&newparent).expect("newparent");
            np.nlink = (i64::from(np.nlink) - delta) as u32;
        }
        if kind != Kind::Dir {
            recs.get_mut(&ino).expect("src").parent = 0;
        }
        if tkind != Kind::Dir {
            recs.get_mut(&tino).expect("dst").parent = 0;
        }
        let a = DirentRecord {
            name: newname.to_vec(),
            ino,
            kind,
        };
        let b = DirentRecord {
            name: name.to_vec(),
            ino: tino,
            kind: tkind,
        };
        let mut batch = vec![
            Mutation::Put {
                key: dirent_key(newparent, newname),
                data: a.encode().into(),
            },
            Mutation::Put {
                key: dirent_key(parent, name),
                data: b.encode().into(),
            },
        ];
        batch.extend(recs.values().map(persist));
        self.mirror.apply(batch)?;
        for (i, r) in recs {
            let st = guard_of(&mut guards, i);
            st.rec = r;
            st.dirty = false;
        }
        drop(guards);
        self.dir(parent)?
            .write()
            .insert(name.to_vec(), (tino, tkind));
        self.dir(newparent)?
            .write()
            .insert(newname.to_vec(), (ino, kind));
        Ok(())
    }

    // ----- attributes ----------------------------------------------------------------------

    /// Changes attributes; a size change truncates or extends the file.
    pub fn setattr(&self, ino: u64, set: SetAttr) -> FsResult<InodeRecord> {
        self.write_guard()?;
        let node = self.node(ino)?;
        let mut st = node.state.lock();
        let mut rec = st.rec.clone();
        let now = Timestamp::now();
        let mut batch = Vec::new();
        if let Some(size) = set.size {
            match rec.kind {
                Kind::File => {}
                Kind::Dir => return Err(FsError::IsDir),
                _ => return Err(FsError::Invalid),
            }
            if size > MAX_FILE_SIZE {
                return Err(FsError::TooBig);
            }
            batch.extend(self.cut_at(&rec, size.min(rec.size)));
            rec.size = size;
            rec.mtime = now;
        }
        if let Some(mode) = set.mode {
            rec.perm = mode & 0o7777;
        }
        if let Some(uid) = set.uid {
            rec.uid = uid;
        }
        if let Some(gid) = set.gid {
            rec.gid = gid;
        }
        let resolve = |t: TimeSet| match t {
            TimeSet::Now => now,
            TimeSet::At(t) => t,
        };
        if let Some(t) = set.atime {
            rec.atime = resolve(t);
        }
        if let Some(t) = set.mtime {
            rec.mtime = resolve(t);
        }
        rec.ctime = set.ctime.unwrap_or(now);
        batch.push(persist(&rec));
        self.mirror.apply(batch)?;
        st.rec = rec.clone();
        st.dirty = false;
        Ok(rec)
    }

    /// `fallocate` mode 0: makes the file at least `offset + length` bytes long. Space is
    /// not reserved on the backends (blocks are written when data is).
    pub fn allocate(&self, ino: u64, offset: u64, length: u64) -> FsResult<()> {
        let end = offset.checked_add(length).ok_or(FsError::TooBig)?;
        let size = self.getattr(ino)?.size;
        if end > size {
            self.setattr(
                ino,
                SetAttr {
                    size: Some(end),
                    ..SetAttr::default()
                },
            )?;
        }
        Ok(())
    }

    /// Mutations that make every byte at or after `at` read as zeros: the block holding
    /// `at` is cut there and every later block (below the high-water mark) is removed.
    fn cut_at(&self, rec: &InodeRecord, at: u64) -> Vec<Mutation> {
        let ino = rec.ino;
        let index = at / self.block_size;
        let within = at % self.block_size;
        let mut batch = Vec::new();
        let mut first_gone = index;
        if within > 0 && index < rec.blocks_hw {
            batch.push(Mutation::Truncate {
                key: block_key(ino, index),
                len: within,
            });
            first_gone = index + 1;
        }
        if first_gone < rec.blocks_hw {
            batch.push(Mutation::TrimBlocks {
                ino,
                from: first_gone,
                to: rec.blocks_hw,
            });
        }
        batch
    }

    /// The target of a symbolic link.
    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let rec = self.getattr(ino)?;
        rec.target.ok_or(FsError::Invalid)
    }

    // ----- open files ----------------------------------------------------------------------

    /// Opens `ino` with `open(2)` flags and returns a handle.
    pub fn open(&self, ino: u64, flags: i32) -> FsResult<u64> {
        let node = self.node(ino)?;
        let mut st = node.state.lock();
        let acc = flags & libc::O_ACCMODE;
        let writable = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        if writable && st.rec.kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        if writable && self.mirror.read_only() {
            return Err(FsError::ReadOnly);
        }
        st.open += 1;
        drop(st);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let append = flags & libc::O_APPEND != 0;
        self.handles.insert(
            fh,
            Handle {
                ino,
                append,
                listing: None,
            },
        );
        Ok(fh)
    }

    /// Writes `data` at `offset` (at the end for an `O_APPEND` handle); returns bytes written.
    pub fn write(&self, ino: u64, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.write_shared(ino, fh, offset, Arc::from(data))
    }

    /// [`Fs::write`] of a buffer the caller already owns: a write within one block hands the
    /// buffer to every backend as it is, without another copy.
    pub fn write_shared(&self, ino: u64, fh: u64, offset: u64, data: Arc<[u8]>) -> FsResult<u32> {
        self.write_guard()?;
        let append = self.handles.get(&fh).ok_or(FsError::BadHandle)?.append;
        let node = self.node(ino)?;
        let mut st = node.state.lock();
        if st.rec.kind != Kind::File {
            return Err(FsError::Invalid);
        }
        let offset = if append { st.rec.size } else { offset };
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(FsError::TooBig)?;
        if end > MAX_FILE_SIZE {
            return Err(FsError::TooBig);
        }
        if data.is_empty() {
            return Ok(0);
        }
        let mut batch = Vec::new();
        let last_index = (end - 1) / self.block_size;
        if last_index >= st.rec.blocks_hw {
            // Record the new high-water mark before any block above the old one exists.
            st.rec.blocks_hw = (last_index + 1).next_power_of_two();
            batch.push(persist(&st.rec));
        }
        if offset > st.rec.size {
            batch.extend(self.cut_at(&st.rec, st.rec.size));
        }
        let mut pos = offset;
        let mut done = 0;
        while done < data.len() {
            let index = pos / self.block_size;
            let within = pos % self.block_size;
            let n = ((self.block_size - within) as usize).min(data.len() - done);
            let piece = if n == data.len() {
                Arc::clone(&data)
            } else {
                Arc::from(&data[done..done + n])
            };
            batch.push(Mutation::WriteAt {
                key: block_key(ino, index),
                offset: within,
                data: piece,
            });
            pos += n as u64;
            done += n;
        }
        self.mirror.apply(batch)?;
        let now = Timestamp::now();
        st.rec.size = st.rec.size.max(end);
        st.rec.mtime = now;
        st.rec.ctime = now;
        self.set_dirty(ino, &mut st, true);
        Ok(data.len() as u32)
    }

    /// Reads up to `size` bytes at `offset`; holes read as zeros.
    pub fn read(&self, ino: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let file_size = {
            let node = self.node(ino)?;
            let st = node.state.lock();
            if st.rec.kind == Kind::Dir {
                return Err(FsError::IsDir);
            }
            st.rec.size
        };
        if offset >= file_size {
            return Ok(Vec::new());
        }
        let len = (size as u64).min(file_size - offset) as usize;
        let mut out = Vec::with_capacity(len);
        let mut pos = offset;
        while out.len() < len {
            let index = pos / self.block_size;
            let within = pos % self.block_size;
            let n = ((self.block_size - within) as usize).min(len - out.len());
            let start = out.len();
            match self.read_block(ino, index, within, n) {
                // The common case, a read within one block: hand over the buffer as it is.
                Ok(mut bytes) if start == 0 && n == len => {
                    bytes.resize(n, 0);
                    return Ok(bytes);
                }
                Ok(bytes) => out.extend_from_slice(&bytes[..bytes.len().min(n)]),
                Err(MirrorError::NotFound) => {}
                Err(e) => return Err(e.into()),
            }
            out.resize(start + n, 0);
            pos += n as u64;
        }
        Ok(out)
    }

    /// Reads bytes of one block. The read takes no lock, so it may overlap a write of the
    /// same block and see a page whose checksum is not written yet; any checksum mismatch
    /// is therefore read again under the inode lock, which excludes writes, and only then
    /// trusted, counted and repaired (see [`Mirror::get_range_checked`]).
    fn read_block(
        &self,
        ino: u64,
        index: u64,
        within: u64,
        n: usize,
    ) -> Result<Vec<u8>, MirrorError> {
        let key = block_key(ino, index);
        match self.mirror.get_range_checked(&key, within, n) {
            Ok((bytes, false)) => Ok(bytes),
            Ok((_, true)) | Err(MirrorError::Corrupt(_)) => {
                let node = self
                    .node(ino)
                    .map_err(|e| MirrorError::Failed(e.to_string()))?;
                let _st = node.state.lock();
                self.mirror.get_range_healing(&key, within, n)
            }
            Err(e) => Err(e),
        }
    }

    /// Writes back the inode of `ino` if it has unwritten changes; with `sync`, also makes
    /// everything written so far durable on every optimal backend.
    pub fn fsync(&self, ino: u64, sync: bool) -> FsResult<()> {
        let node = self.node(ino)?;
        let mut st = node.state.lock();
        let mut batch = Vec::new();
        if st.dirty {
            batch.push(persist(&st.rec));
        }
        if sync && !self.mirror.read_only() {
            batch.push(Mutation::Sync);
        } else if self.mirror.has_pending(&block_prefix(ino)) {
            // Close: data held in memory for a bucket goes out before close returns.
            batch.push(Mutation::Flush {
                prefix: block_prefix(ino),
            });
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.mirror.apply(batch)?;
        st.dirty = false;
        Ok(())
    }

    /// Called on every `close` of a handle: writes back the inode.
    pub fn flush(&self, ino: u64) -> FsResult<()> {
        self.fsync(ino, false)
    }

    /// Closes a handle; the last close of an unlinked file removes it.
    pub fn release(&self, fh: u64) -> FsResult<()> {
        let Some((_, h)) = self.handles.remove(&fh) else {
            return Err(FsError::BadHandle);
        };
        if h.listing.is_some() {
            return Ok(());
        }
        let node = self.node(h.ino)?;
        let mut st = node.state.lock();
        st.open = st.open.saturating_sub(1);
        if st.open == 0 && st.rec.nlink == 0 && !self.mirror.read_only() {
            self.mirror.apply(self.destroy_mutations(&st.rec))?;
            st.dirty = false;
        } else if !self.mirror.read_only() {
            let mut batch = Vec::new();
            if st.dirty {
                batch.push(persist(&st.rec));
            }
            if self.mirror.has_pending(&block_prefix(h.ino)) {
                batch.push(Mutation::Flush {
                    prefix: block_prefix(h.ino),
                });
            }
            if !batch.is_empty() {
                self.mirror.apply(batch)?;
                st.dirty = false;
            }
        }
        Ok(())
    }

    // ----- answers from memory ---------------------------------------------------------------
    //
    // These never do I/O and never wait for a lock held across I/O (they use `try_lock`), so
    // the FUSE adapter may call them on the thread that reads requests from the kernel.
    // `None` means "cannot tell without I/O": the caller falls back to the full operation.

    /// The attributes of `ino` if they are in memory.
    pub fn cached_attr(&self, ino: u64) -> Option<InodeRecord> {
        let node = self.nodes.get(&ino).map(|n| Arc::clone(&n))?;
        let st = node.state.try_lock()?;
        Some(st.rec.clone())
    }

    /// `lookup` answered from memory, when the directory and the inode are cached.
    pub fn cached_lookup(&self, parent: u64, name: &[u8]) -> Option<FsResult<InodeRecord>> {
        if name.len() > NAME_MAX {
            return Some(Err(FsError::NameTooLong));
        }
        let dir = self.dirs.get(&parent).map(|d| Arc::clone(&d))?;
        let found = dir.try_read()?.get(name).map(|(ino, _)| *ino);
        match found {
            None => Some(Err(FsError::NotFound)),
            Some(ino) => self.cached_attr(ino).map(Ok),
        }
    }

    /// True when `flush` of `ino` has nothing to write (the inode is clean).
    pub fn flush_is_noop(&self, ino: u64) -> bool {
        let Some(node) = self.nodes.get(&ino).map(|n| Arc::clone(&n)) else {
            return false;
        };
        let clean = node.state.try_lock().is_some_and(|st| !st.dirty);
        clean && !self.mirror.has_pending(&block_prefix(ino))
    }

    /// `release` done in memory when it needs no I/O: a directory handle, or a file handle
    /// whose inode is clean and either still linked or still open elsewhere.
    pub fn release_in_memory(&self, fh: u64) -> Option<FsResult<()>> {
        let (ino, is_dir) = {
            let h = self.handles.get(&fh)?;
            (h.ino, h.listing.is_some())
        };
        if is_dir {
            self.handles.remove(&fh);
            return Some(Ok(()));
        }
        let node = self.nodes.get(&ino).map(|n| Arc::clone(&n))?;
        let mut st = node.state.try_lock()?;
        let last_of_unlinked = st.open <= 1 && st.rec.nlink == 0;
        if st.dirty || last_of_unlinked || self.mirror.has_pending(&block_prefix(ino)) {
            return None;
        }
        self.handles.remove(&fh)?;
        st.open = st.open.saturating_sub(1);
        Some(Ok(()))
    }

    // ----- directories ---------------------------------------------------------------------

    /// Opens a directory, taking a snapshot of its entries (with `.` and `..`).
    pub fn opendir(&self, ino: u64) -> FsResult<u64> {
        let rec = self.getattr(ino)?;
        if rec.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        let dir = self.dir(ino)?;
        let parent = if rec.parent == 0 { ino } else { rec.parent };
        let mut listing = vec![
            DirEntry {
                name: b".".to_vec(),
                ino,
                kind: Kind::Dir,
            },
            DirEntry {
                name: b"..".to_vec(),
                ino: parent,
                kind: Kind::Dir,
            },
        ];
        for (name, (child, kind)) in dir.read().iter() {
            listing.push(DirEntry {
                name: name.clone(),
                ino: *child,
                kind: *kind,
            });
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let handle = Handle {
            ino,
            append: false,
            listing: Some(listing.into()),
        };
        self.handles.insert(fh, handle);
        Ok(fh)
    }

    /// The snapshot taken by `opendir`.
    pub fn listing(&self, fh: u64) -> FsResult<Arc<Vec<DirEntry>>> {
        let h = self.handles.get(&fh).ok_or(FsError::BadHandle)?;
        h.listing.clone().ok_or(FsError::BadHandle)
    }

    // ----- extended attributes -------------------------------------------------------------

    /// Sets an extended attribute; `create`/`replace` are `XATTR_CREATE`/`XATTR_REPLACE`.
    pub fn setxattr(
        &self,
        ino: u64,
        name: &[u8],
        value: &[u8],
        create: bool,
        replace: bool,
    ) -> FsResult<()> {
        self.write_guard()?;
        check_xattr_name(name)?;
        if value.len() > XATTR_SIZE_MAX {
            return Err(FsError::TooBig);
        }
        self.update_xattrs(ino, |xattrs| {
            let pos = xattrs.iter().position(|(n, _)| n == name);
            match (pos, create, replace) {
                (Some(_), true, _) => Err(FsError::Exists),
                (None, _, true) => Err(FsError::NoAttr),
                (Some(i), _, _) => {
                    xattrs[i].1 = value.to_vec();
                    Ok(())
                }
                (None, _, _) => {
                    xattrs.push((name.to_vec(), value.to_vec()));
                    xattrs.sort();
                    Ok(())
                }
            }
        })
    }

    /// Removes an extended attribute.
    pub fn removexattr(&self, ino: u64, name: &[u8]) -> FsResult<()> {
        self.write_guard()?;
        check_xattr_name(name)?;
        self.update_xattrs(ino, |xattrs| {
            let pos = xattrs
                .iter()
                .position(|(n, _)| n == name)
                .ok_or(FsError::NoAttr)?;
            xattrs.remove(pos);
            Ok(())
        })
    }

    fn update_xattrs(
        &self,
        ino: u64,
        change: impl FnOnce(&mut Vec<(Vec<u8>, Vec<u8>)>) -> FsResult<()>,
    ) -> FsResult<()> {
        let node = self.node(ino)?;
        let mut st = node.state.lock();
        let mut rec = st.rec.clone();
        change(&mut rec.xattrs)?;
        rec.ctime = Timestamp::now();
        self.mirror.apply(vec![persist(&rec)])?;
        st.rec = rec;
        st.dirty = false;
        Ok(())
    }

    /// The value of an extended attribute.
    pub fn getxattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        check_xattr_name(name)?;
        let rec = self.getattr(ino)?;
        let found = rec.xattrs.into_iter().find(|(n, _)| n == name);
        found.map(|(_, v)| v).ok_or(FsError::NoAttr)
    }

    /// The names of all extended attributes, each followed by a NUL byte.
    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<u8>> {
        let rec = self.getattr(ino)?;
        let mut out = Vec::new();
        for (name, _) in rec.xattrs {
            out.extend_from_slice(&name);
            out.push(0);
        }
        Ok(out)
    }

    // ----- whole filesystem ----------------------------------------------------------------

    /// Space figures for `statfs`.
    pub fn statfs(&self) -> FsStats {
        let (total_bytes, free_bytes) = self.mirror.space().unwrap_or((0, 0));
        FsStats {
            total_bytes,
            free_bytes,
            files: self.nodes.len() as u64,
        }
    }

    /// Writes back every inode with unwritten changes and closes the mirror cleanly.
    pub fn shutdown(&self) -> FsResult<()> {
        if self.mirror.read_only() {
            return Ok(());
        }
        let mut closed = self.closed.lock();
        if *closed {
            return Ok(());
        }
        *closed = true;
        self.write_back_dirty()?;
        self.mirror.close()?;
        Ok(())
    }
}

/// Only the namespaces Linux filesystems commonly store are accepted. POSIX ACLs
/// (`system.posix_acl_*`) are not supported.
fn check_xattr_name(name: &[u8]) -> FsResult<()> {
    if name.is_empty() {
        return Err(FsError::Invalid);
    }
    if name.len() > NAME_MAX {
        return Err(FsError::TooBig);
    }
    let known = [&b"user."[..], b"trusted.", b"security."];
    if known
        .iter()
        .any(|p| name.starts_with(p) && name.len() > p.len())
    {
        Ok(())
    } else {
        Err(FsError::NotSupported)
    }
}

#[cfg(test)]
mod tests;
