//! The FUSE adapter: converts kernel requests into fs-layer calls and replies.
//!
//! Every handler copies its arguments, hands the call to a worker pool and returns at once,
//! so the thread reading requests from the kernel never waits for backend I/O and requests
//! on different files proceed in parallel. The worker calls the fs layer and replies (or maps
//! the error with [`FsError::errno`]). Requests that memory can answer without waiting
//! (`getattr` and `lookup` of cached inodes, `flush` of a clean inode, most `release`s) are
//! answered on the reading thread, which saves a thread handoff each.
//!
//! Caching: the mount is the only writer of its backends, so attributes and entries stay
//! valid; they are given to the kernel with a TTL of [`TTL`]. The kernel checks permissions
//! itself (`default_permissions`), which is why `access` only confirms the inode exists.
//! Writes are not cached in the kernel (no writeback cache): each one reaches the backends
//! before `write(2)` returns. Writes of up to 1 MiB are requested.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};
use log::{debug, error, warn};

use crate::fs::{Caller, Fs, FsError, RenameFlags, SetAttr, TimeSet};
use crate::layout::{InodeRecord, Kind, Timestamp};
use crate::pool::WorkerPool;

/// How long the kernel may cache attributes and entries.
pub const TTL: Duration = Duration::from_secs(10);

/// Largest write and read request asked of the kernel.
pub const MAX_IO: u32 = 1 << 20;

/// Threads answering requests.
const WORKERS: usize = 16;

/// The `fuser::Filesystem` implementation.
pub struct MirrorFuse {
    fs: Arc<Fs>,
    pool: WorkerPool,
}

impl MirrorFuse {
    /// Wraps a filesystem for mounting.
    pub fn new(fs: Arc<Fs>) -> MirrorFuse {
        MirrorFuse {
            fs,
            pool: WorkerPool::new("fuse", WORKERS),
        }
    }

    /// Runs `f` on a worker with a handle to the filesystem.
    fn spawn(&self, f: impl FnOnce(&Fs) + Send + 'static) {
        let fs = Arc::clone(&self.fs);
        self.pool.submit(Box::new(move || f(&fs)));
    }
}

fn kind_to_fuse(kind: Kind) -> FileType {
    match kind {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
    }
}

fn attr(rec: &InodeRecord) -> FileAttr {
    FileAttr {
        ino: INodeNo(rec.ino),
        size: rec.size,
        blocks: rec.size.div_ceil(512),
        atime: rec.atime.to_system(),
        mtime: rec.mtime.to_system(),
        ctime: rec.ctime.to_system(),
        crtime: rec.crtime.to_system(),
        kind: kind_to_fuse(rec.kind),
        perm: rec.perm as u16,
        nlink: rec.nlink,
        uid: rec.uid,
        gid: rec.gid,
        rdev: rec.rdev,
        blksize: 4096,
        flags: 0,
    }
}

/// Logs an error where it is handled, at a level that says how much it matters.
fn errno(op: &str, ino: u64, e: FsError) -> Errno {
    match &e {
        FsError::Io(_) | FsError::Corrupt(_) => error!("{op} ino {ino:#x}: {e}"),
        FsError::NoSpace | FsError::ReadOnly => warn!("{op} ino {ino:#x}: {e}"),
        _ => debug!("{op} ino {ino:#x}: {e}"),
    }
    Errno::from_i32(e.errno())
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn reply_entry(reply: ReplyEntry, op: &str, parent: u64, r: Result<InodeRecord, FsError>) {
    match r {
        Ok(rec) => reply.entry(&TTL, &attr(&rec), Generation(0)),
        Err(e) => reply.error(errno(op, parent, e)),
    }
}

fn reply_empty(reply: ReplyEmpty, op: &str, ino: u64, r: Result<(), FsError>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(op, ino, e)),
    }
}

fn time_set(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(t) => TimeSet::At(Timestamp::from_fuser_request(t)),
    }
}

fn reply_xattr(reply: ReplyXattr, size: u32, op: &str, ino: u64, r: Result<Vec<u8>, FsError>) {
    match r {
        Ok(data) if size == 0 => reply.size(data.len() as u32),
        Ok(data) if data.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(data) => reply.data(&data),
        Err(e) => reply.error(errno(op, ino, e)),
    }
}

impl Filesystem for MirrorFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(max) = config.set_max_write(MAX_IO) {
            warn!("kernel limits writes to {max} bytes");
        }
        let _ = config.set_max_readahead(MAX_IO);
        let wanted =
            fuser::InitFlags::FUSE_DO_READDIRPLUS | fuser::InitFlags::FUSE_READDIRPLUS_AUTO;
        let _ = config.add_capabilities(wanted);
        Ok(())
    }

    fn destroy(&mut self) {
        if let Err(e) = self.fs.shutdown() {
            error!("shutdown incomplete: {e}");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if let Some(r) = self.fs.cached_lookup(parent.0, name.as_bytes()) {
            return reply_entry(reply, "lookup", parent.0, r);
        }
        let name = name.as_bytes().to_vec();
        self.spawn(move |fs| reply_entry(reply, "lookup", parent.0, fs.lookup(parent.0, &name)));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if let Some(rec) = self.fs.cached_attr(ino.0) {
            return reply.attr(&TTL, &attr(&rec));
        }
        self.spawn(move |fs| match fs.getattr(ino.0) {
            Ok(rec) => reply.attr(&TTL, &attr(&rec)),
            Err(e) => reply.error(errno("getattr", ino.0, e)),
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time_set),
            mtime: mtime.map(time_set),
            ctime: ctime.map(Timestamp::from_fuser_request),
        };
        self.spawn(move |fs| match fs.setattr(ino.0, set) {
            Ok(rec) => reply.attr(&TTL, &attr(&rec)),
            Err(e) => reply.error(errno("setattr", ino.0, e)),
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.spawn(move |fs| match fs.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno("readlink", ino.0, e)),
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let (who, name) = (caller(req), name.as_bytes().to_vec());
        let mode = mode & !(umask & 0o777) | (mode & libc::S_IFMT);
        self.spawn(move |fs| {
            reply_entry(
                reply,
                "mknod",
                parent.0,
                fs.mknod(who, parent.0, &name, mode, rdev),
            )
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let (who, name) = (caller(req), name.as_bytes().to_vec());
        let mode = mode & !umask;
        self.spawn(move |fs| {
            reply_entry(
                reply,
                "mkdir",
                parent.0,
                fs.mkdir(who, parent.0, &name, mode),
            )
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.as_bytes().to_vec();
        self.spawn(move |fs| reply_empty(reply, "unlink", parent.0, fs.unlink(parent.0, &name)));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.as_bytes().to_vec();
        self.spawn(move |fs| reply_empty(reply, "rmdir", parent.0, fs.rmdir(parent.0, &name)));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let who = caller(req);
        let name = link_name.as_bytes().to_vec();
        let target = target.as_os_str().as_bytes().to_vec();
        self.spawn(move |fs| {
            reply_entry(
                reply,
                "symlink",
                parent.0,
                fs.symlink(who, parent.0, &name, &target),
            )
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (name, newname) = (name.as_bytes().to_vec(), newname.as_bytes().to_vec());
        if flags.contains(fuser::RenameFlags::RENAME_WHITEOUT) {
            // Whiteouts only matter to overlay filesystems; not supported.
            reply.error(Errno::EINVAL);
            return;
        }
        let flags = RenameFlags {
            noreplace: flags.contains(fuser::RenameFlags::RENAME_NOREPLACE),
            exchange: flags.contains(fuser::RenameFlags::RENAME_EXCHANGE),
        };
        self.spawn(move |fs| {
            let r = fs.rename(parent.0, &name, newparent.0, &newname, flags);
            reply_empty(reply, "rename", parent.0, r)
        });
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let newname = newname.as_bytes().to_vec();
        self.spawn(move |fs| {
            reply_entry(reply, "link", ino.0, fs.link(ino.0, newparent.0, &newname))
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.spawn(move |fs| match fs.open(ino.0, flags.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno("open", ino.0, e)),
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        debug!(
            "read ino {:#x} fh {} offset {offset} size {size}",
            ino.0, _fh.0
        );
        self.spawn(move |fs| match fs.read(ino.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno("read", ino.0, e)),
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        debug!(
            "write ino {:#x} fh {} offset {offset} size {}",
            ino.0,
            fh.0,
            data.len()
        );
        let data: Arc<[u8]> = Arc::from(data);
        self.spawn(move |fs| match fs.write_shared(ino.0, fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno("write", ino.0, e)),
        });
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        if self.fs.flush_is_noop(ino.0) {
            return reply.ok();
        }
        self.spawn(move |fs| reply_empty(reply, "flush", ino.0, fs.flush(ino.0)));
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some(r) = self.fs.release_in_memory(fh.0) {
            return reply_empty(reply, "release", ino.0, r);
        }
        self.spawn(move |fs| reply_empty(reply, "release", ino.0, fs.release(fh.0)));
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn(move |fs| reply_empty(reply, "fsync", ino.0, fs.fsync(ino.0, true)));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.spawn(move |fs| match fs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno("opendir", ino.0, e)),
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.spawn(move |fs| {
            let listing = match fs.listing(fh.0) {
                Ok(l) => l,
                Err(e) => return reply.error(errno("readdir", ino.0, e)),
            };
            for (i, entry) in listing.iter().enumerate().skip(offset as usize) {
                let name = OsStr::from_bytes(&entry.name);
                let kind = kind_to_fuse(entry.kind);
                if reply.add(INodeNo(entry.ino), i as u64 + 1, kind, name) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        self.spawn(move |fs| {
            let listing = match fs.listing(fh.0) {
                Ok(l) => l,
                Err(e) => return reply.error(errno("readdirplus", ino.0, e)),
            };
            for (i, entry) in listing.iter().enumerate().skip(offset as usize) {
                // An entry removed since opendir is skipped rather than failing the listing.
                let Ok(rec) = fs.getattr(entry.ino) else {
                    continue;
                };
                let name = OsStr::from_bytes(&entry.name);
                if reply.add(
                    INodeNo(entry.ino),
                    i as u64 + 1,
                    name,
                    &TTL,
                    &attr(&rec),
                    Generation(0),
                ) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        if let Some(r) = self.fs.release_in_memory(fh.0) {
            return reply_empty(reply, "releasedir", ino.0, r);
        }
        self.spawn(move |fs| reply_empty(reply, "releasedir", ino.0, fs.release(fh.0)));
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn(move |fs| reply_empty(reply, "fsyncdir", ino.0, fs.fsync(ino.0, true)));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.spawn(move |fs| {
            let st = fs.statfs();
            let bsize = 4096u64;
            let blocks = st.total_bytes / bsize;
            let bfree = st.free_bytes / bsize;
            let ffree = u64::from(u32::MAX);
            reply.statfs(
                blocks,
                bfree,
                bfree,
                st.files + ffree,
                ffree,
                bsize as u32,
                255,
                4096,
            );
        });
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let (name, value) = (name.as_bytes().to_vec(), value.to_vec());
        let create = flags & libc::XATTR_CREATE != 0;
        let replace = flags & libc::XATTR_REPLACE != 0;
        self.spawn(move |fs| {
            let r = fs.setxattr(ino.0, &name, &value, create, replace);
            reply_empty(reply, "setxattr", ino.0, r)
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let name = name.as_bytes().to_vec();
        self.spawn(move |fs| {
            reply_xattr(reply, size, "getxattr", ino.0, fs.getxattr(ino.0, &name))
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.spawn(move |fs| reply_xattr(reply, size, "listxattr", ino.0, fs.listxattr(ino.0)));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.as_bytes().to_vec();
        self.spawn(move |fs| {
            reply_empty(reply, "removexattr", ino.0, fs.removexattr(ino.0, &name))
        });
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        self.spawn(move |fs| reply_empty(reply, "access", ino.0, fs.getattr(ino.0).map(|_| ())));
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if mode != 0 {
            // Punching holes, zeroing and collapsing ranges are not supported.
            reply.error(Errno::EOPNOTSUPP);
            return;
        }
        self.spawn(move |fs| {
            reply_empty(
                reply,
                "fallocate",
                ino.0,
                fs.allocate(ino.0, offset, length),
            )
        });
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // No ioctls are supported; ENOTTY is what tools like isatty() expect to hear.
        reply.error(Errno::ENOTTY);
    }

    fn getlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        _start: u64,
        _end: u64,
        _typ: i32,
        _pid: u32,
        reply: fuser::ReplyLock,
    ) {
        // ENOSYS makes the kernel manage POSIX locks itself, which is correct for a
        // filesystem that only this mount accesses.
        reply.error(Errno::ENOSYS);
    }

    fn setlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        _start: u64,
        _end: u64,
        _typ: i32,
        _pid: u32,
        _sleep: bool,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: i64,
        _whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        // ENOSYS: the kernel answers lseek itself (SEEK_DATA/SEEK_HOLE see no holes).
        reply.error(Errno::ENOSYS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        // ENOSYS: the kernel falls back to reading and writing.
        reply.error(Errno::ENOSYS);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (who, name) = (caller(req), name.as_bytes().to_vec());
        let mode = mode & !umask;
        self.spawn(
            move |fs| match fs.create(who, parent.0, &name, mode, flags) {
                Ok((rec, fh)) => reply.created(
                    &TTL,
                    &attr(&rec),
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::empty(),
                ),
                Err(e) => reply.error(errno("create", parent.0, e)),
            },
        );
    }
}
