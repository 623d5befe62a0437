//! Differential test: one seeded random sequence of filesystem operations is applied both to a
//! live mirrorfs mount (two backends) and to a plain directory on the host filesystem. Every
//! result (success or errno, bytes read, stat fields, xattr values, directory listings) is
//! compared step by step, the metadata of both trees after every step, and the full trees
//! (contents, xattrs, hard-link groups) every 25 steps. Every 100 steps, and at the end, all
//! fds are closed, the full trees compared, the filesystem unmounted and mounted again, and
//! the full trees compared once more (persistence); 40 more steps run after the last remount.
//!
//! The operations work on a small namespace (six names, directories up to three levels deep)
//! so that collisions are frequent: create/write at random offsets (holes, writes across 1 MiB
//! boundaries), reads, truncate, O_APPEND, rename and renameat2 (RENAME_NOREPLACE,
//! RENAME_EXCHANGE), link, symlink/readlink, chmod, mkdir/rmdir, unlink, user xattrs, stat,
//! readdir, and I/O through a few file descriptors held open across steps (including after
//! their path was unlinked or renamed), with fsync.
//!
//! Reproduce one seed with `MIRRORFS_DIFF_SEED=<seed> MIRRORFS_DIFF_OPS=<ops>`; a failure
//! prints the seed, the step, the operation, both results and the op log so far. A proptest
//! variant (`differential_proptest`, `PROPTEST_CASES` cases, default 4) shrinks a failure to a
//! short op sequence, and `differential_engine_self_check` runs the engine on two native
//! directories to check the engine itself (generator coverage and comparator).
//!
//! Only relative, downward symlink targets are generated, so following a link can never leave
//! the directory under test, wherever the link is later moved.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fmt;
use std::fs::{self, File, Metadata};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::{FromRawFd, IntoRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::Fixture;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

// ------------------------------------------------------------------------------------------
// Configuration
// ------------------------------------------------------------------------------------------

/// Seeds run by default; `MIRRORFS_DIFF_SEED` replaces them with a single seed.
const DEFAULT_SEEDS: [u64; 8] = [1, 2, 3, 4, 5, 6, 7, 8];
/// Operations per seed before the remount; `MIRRORFS_DIFF_OPS` overrides it.
const DEFAULT_OPS: usize = 300;
/// Operations run after the last remount, on the persisted state.
const OPS_AFTER_REMOUNT: usize = 40;
/// The filesystem is unmounted and mounted again after every this many operations.
const REMOUNT_EVERY: usize = 100;
/// A full tree comparison (contents, xattrs, hard links) runs every this many steps.
const FULL_CHECK_EVERY: usize = 25;
/// The watchdog prints the op log when one step takes longer than this.
const HANG_LIMIT: Duration = Duration::from_secs(60);

const NAMES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
const MAX_DEPTH: usize = 3;
const SLOTS: usize = 3;
const MIB: u64 = 1 << 20;
const MAX_LEN: usize = 200 * 1024;
const XATTR_NAMES: [&str; 3] = ["user.a", "user.b", "user.mirror.test"];

fn env_number(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
    )
}

fn config() -> (Vec<u64>, usize) {
    let ops = env_number("MIRRORFS_DIFF_OPS").map_or(DEFAULT_OPS, |n| n as usize);
    let seeds = match env_number("MIRRORFS_DIFF_SEED") {
        Some(seed) => vec![seed],
        None => DEFAULT_SEEDS.to_vec(),
    };
    (seeds, ops)
}

// ------------------------------------------------------------------------------------------
// Operations and their results
// ------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    /// open(O_WRONLY|O_CREAT[|O_TRUNC][|O_EXCL]), pwrite, [fsync], close.
    Write {
        path: String,
        offset: u64,
        len: usize,
        fill: u32,
        trunc: bool,
        excl: bool,
        fsync: bool,
    },
    /// open(O_WRONLY|O_CREAT|O_APPEND), write, fstat; the result is the new size.
    Append {
        path: String,
        len: usize,
        fill: u32,
    },
    Read {
        path: String,
        offset: u64,
        len: usize,
    },
    Truncate {
        path: String,
        size: u64,
    },
    /// rename (flags 0) or renameat2 with RENAME_NOREPLACE / RENAME_EXCHANGE.
    Rename {
        from: String,
        to: String,
        flags: u32,
    },
    Link {
        from: String,
        to: String,
    },
    Symlink {
        target: String,
        path: String,
    },
    Readlink {
        path: String,
    },
    Chmod {
        path: String,
        mode: u32,
    },
    Mkdir {
        path: String,
        mode: u32,
    },
    Rmdir {
        path: String,
    },
    Unlink {
        path: String,
    },
    SetXattr {
        path: String,
        name: &'static str,
        len: usize,
        fill: u32,
        flags: i32,
    },
    GetXattr {
        path: String,
        name: &'static str,
    },
    ListXattr {
        path: String,
    },
    RemoveXattr {
        path: String,
        name: &'static str,
    },
    Stat {
        path: String,
        follow: bool,
    },
    ReadDir {
        path: String,
    },
    FdOpen {
        slot: usize,
        path: String,
        flags: i32,
    },
    FdWrite {
        slot: usize,
        offset: u64,
        len: usize,
        fill: u32,
    },
    FdRead {
        slot: usize,
        offset: u64,
        len: usize,
    },
    FdTruncate {
        slot: usize,
        size: u64,
    },
    FdSync {
        slot: usize,
        data_only: bool,
    },
    FdStat {
        slot: usize,
    },
    FdClose {
        slot: usize,
    },
}

impl Op {
    fn kind(&self) -> &'static str {
        match self {
            Op::Write { .. } => "write",
            Op::Append { .. } => "append",
            Op::Read { .. } => "read",
            Op::Truncate { .. } => "truncate",
            Op::Rename { flags: 0, .. } => "rename",
            Op::Rename { flags, .. } if *flags == libc::RENAME_NOREPLACE => "rename-noreplace",
            Op::Rename { .. } => "rename-exchange",
            Op::Link { .. } => "link",
            Op::Symlink { .. } => "symlink",
            Op::Readlink { .. } => "readlink",
            Op::Chmod { .. } => "chmod",
            Op::Mkdir { .. } => "mkdir",
            Op::Rmdir { .. } => "rmdir",
            Op::Unlink { .. } => "unlink",
            Op::SetXattr { .. } => "setxattr",
            Op::GetXattr { .. } => "getxattr",
            Op::ListXattr { .. } => "listxattr",
            Op::RemoveXattr { .. } => "removexattr",
            Op::Stat { .. } => "stat",
            Op::ReadDir { .. } => "readdir",
            Op::FdOpen { .. } => "fd-open",
            Op::FdWrite { .. } => "fd-write",
            Op::FdRead { .. } => "fd-read",
            Op::FdTruncate { .. } => "fd-truncate",
            Op::FdSync { .. } => "fd-sync",
            Op::FdStat { .. } => "fd-stat",
            Op::FdClose { .. } => "fd-close",
        }
    }
}

fn open_flags_text(flags: i32) -> String {
    let mut s = String::from(match flags & libc::O_ACCMODE {
        libc::O_RDONLY => "O_RDONLY",
        libc::O_WRONLY => "O_WRONLY",
        _ => "O_RDWR",
    });
    for (bit, name) in [
        (libc::O_CREAT, "|O_CREAT"),
        (libc::O_EXCL, "|O_EXCL"),
        (libc::O_TRUNC, "|O_TRUNC"),
        (libc::O_APPEND, "|O_APPEND"),
    ] {
        if flags & bit != 0 {
            s.push_str(name);
        }
    }
    s
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Write {
                path,
                offset,
                len,
                fill,
                trunc,
                excl,
                fsync,
            } => {
                write!(f, "write {path} off={offset} len={len} fill={fill:#x}")?;
                for (on, what) in [(trunc, " O_TRUNC"), (excl, " O_EXCL"), (fsync, " fsync")] {
                    if *on {
                        f.write_str(what)?;
                    }
                }
                Ok(())
            }
            Op::Append { path, len, fill } => write!(f, "append {path} len={len} fill={fill:#x}"),
            Op::Read { path, offset, len } => write!(f, "read {path} off={offset} len={len}"),
            Op::Truncate { path, size } => write!(f, "truncate {path} size={size}"),
            Op::Rename { from, to, flags } => {
                let how = match *flags {
                    0 => "rename",
                    libc::RENAME_NOREPLACE => "renameat2(NOREPLACE)",
                    _ => "renameat2(EXCHANGE)",
                };
                write!(f, "{how} {from} -> {to}")
            }
            Op::Link { from, to } => write!(f, "link {from} -> {to}"),
            Op::Symlink { target, path } => write!(f, "symlink {path} -> {target:?}"),
            Op::Readlink { path } => write!(f, "readlink {path}"),
            Op::Chmod { path, mode } => write!(f, "chmod {path} {mode:04o}"),
            Op::Mkdir { path, mode } => write!(f, "mkdir {path} {mode:04o}"),
            Op::Rmdir { path } => write!(f, "rmdir {path}"),
            Op::Unlink { path } => write!(f, "unlink {path}"),
            Op::SetXattr {
                path,
                name,
                len,
                fill,
                flags,
            } => {
                let how = match *flags {
                    libc::XATTR_CREATE => " XATTR_CREATE",
                    libc::XATTR_REPLACE => " XATTR_REPLACE",
                    _ => "",
                };
                write!(f, "setxattr {path} {name} len={len} fill={fill:#x}{how}")
            }
            Op::GetXattr { path, name } => write!(f, "getxattr {path} {name}"),
            Op::ListXattr { path } => write!(f, "listxattr {path}"),
            Op::RemoveXattr { path, name } => write!(f, "removexattr {path} {name}"),
            Op::Stat { path, follow: true } => write!(f, "stat {path}"),
            Op::Stat {
                path,
                follow: false,
            } => write!(f, "lstat {path}"),
            Op::ReadDir { path } => write!(f, "readdir {path:?}"),
            Op::FdOpen { slot, path, flags } => {
                write!(f, "fd{slot} = open {path} {}", open_flags_text(*flags))
            }
            Op::FdWrite {
                slot,
                offset,
                len,
                fill,
            } => {
                write!(f, "fd{slot} pwrite off={offset} len={len} fill={fill:#x}")
            }
            Op::FdRead { slot, offset, len } => write!(f, "fd{slot} pread off={offset} len={len}"),
            Op::FdTruncate { slot, size } => write!(f, "fd{slot} ftruncate size={size}"),
            Op::FdSync {
                slot,
                data_only: false,
            } => write!(f, "fd{slot} fsync"),
            Op::FdSync {
                slot,
                data_only: true,
            } => write!(f, "fd{slot} fdatasync"),
            Op::FdStat { slot } => write!(f, "fd{slot} fstat"),
            Op::FdClose { slot } => write!(f, "fd{slot} close"),
        }
    }
}

/// The stat fields compared: type, full st_mode, and for non-directories size and link count
/// (directory sizes and link counts legitimately differ between filesystems).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Meta {
    kind: char,
    mode: u32,
    size: Option<u64>,
    nlink: Option<u64>,
}

impl fmt::Display for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} mode={:o}", self.kind, self.mode)?;
        if let Some(size) = self.size {
            write!(f, " size={size}")?;
        }
        if let Some(nlink) = self.nlink {
            write!(f, " nlink={nlink}")?;
        }
        Ok(())
    }
}

fn meta_of(md: &Metadata) -> Meta {
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        'd'
    } else if ft.is_file() {
        'f'
    } else if ft.is_symlink() {
        'l'
    } else {
        '?'
    };
    let not_dir = kind != 'd';
    Meta {
        kind,
        mode: md.mode(),
        size: not_dir.then(|| md.size()),
        nlink: not_dir.then(|| md.nlink()),
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Val {
    Unit,
    Count(u64),
    Bytes(Vec<u8>),
    Text(String),
    Names(Vec<String>),
    Meta(Meta),
}

/// The result of one operation: a value, or the errno of the first failing call.
type Outcome = Result<Val, i32>;

fn errno_name(e: i32) -> String {
    let name = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOTCONN => "ENOTCONN",
        libc::ESTALE => "ESTALE",
        _ => "errno",
    };
    format!("{name}({e})")
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn show(o: &Outcome) -> String {
    match o {
        Err(e) => format!("err {}", errno_name(*e)),
        Ok(Val::Unit) => "ok".to_string(),
        Ok(Val::Count(n)) => format!("ok {n}"),
        Ok(Val::Bytes(b)) => format!("ok {} bytes (fnv {:016x})", b.len(), fnv(b)),
        Ok(Val::Text(t)) => format!("ok {t:?}"),
        Ok(Val::Names(n)) => format!("ok {n:?}"),
        Ok(Val::Meta(m)) => format!("ok {m}"),
    }
}

/// Describes where two byte strings first differ.
fn bytes_diff(a: &[u8], b: &[u8], names: [&str; 2]) -> String {
    let first = a.iter().zip(b).position(|(x, y)| x != y);
    let mut s = format!(
        "lengths {} {} vs {} {}",
        names[0],
        a.len(),
        names[1],
        b.len()
    );
    match first {
        Some(i) => {
            let zeros = |v: &[u8]| v[i..].iter().take(64).all(|&x| x == 0);
            s.push_str(&format!(
                "; first difference at offset {i} ({} {:#04x}{}, {} {:#04x}{})",
                names[0],
                a[i],
                if zeros(a) { " zeros follow" } else { "" },
                names[1],
                b[i],
                if zeros(b) { " zeros follow" } else { "" },
            ));
        }
        None if a.len() != b.len() => s.push_str("; one is a prefix of the other"),
        None => {}
    }
    s
}

// ------------------------------------------------------------------------------------------
// Thin syscall wrappers
// ------------------------------------------------------------------------------------------

fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(-1)
}

fn os(e: io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("string without NUL")
}

fn check(rc: libc::c_int) -> Result<Val, i32> {
    if rc < 0 {
        Err(last_errno())
    } else {
        Ok(Val::Unit)
    }
}

fn open_raw(p: &Path, flags: i32, mode: u32) -> Result<File, i32> {
    let c = cpath(p);
    // SAFETY: `c` is a valid NUL-terminated path; the returned fd is owned by the File.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) };
    if fd < 0 {
        Err(last_errno())
    } else {
        // SAFETY: `fd` was just opened and is owned by nobody else.
        Ok(unsafe { File::from_raw_fd(fd) })
    }
}

/// Closes `f` and reports the error of close(2) (on FUSE: the FLUSH reply).
fn close_checked(f: File) -> Result<(), i32> {
    let fd = f.into_raw_fd();
    // SAFETY: we own `fd` (taken out of the File) and close it exactly once.
    if unsafe { libc::close(fd) } < 0 {
        Err(last_errno())
    } else {
        Ok(())
    }
}

fn read_range(f: &File, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match f.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(os(e)),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

fn xattr_get(p: &Path, name: &str, follow: bool) -> Result<Vec<u8>, i32> {
    let (c, n) = (cpath(p), cstr(name));
    let mut buf = vec![0u8; 65536];
    let ptr = buf.as_mut_ptr() as *mut libc::c_void;
    // SAFETY: valid C strings and a buffer of the given length.
    let r = unsafe {
        if follow {
            libc::getxattr(c.as_ptr(), n.as_ptr(), ptr, buf.len())
        } else {
            libc::lgetxattr(c.as_ptr(), n.as_ptr(), ptr, buf.len())
        }
    };
    if r < 0 {
        return Err(last_errno());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

/// Sorted xattr names, without security.* (labels the host may add on its own).
fn xattr_list(p: &Path, follow: bool) -> Result<Vec<String>, i32> {
    let c = cpath(p);
    let mut buf = vec![0u8; 65536];
    let ptr = buf.as_mut_ptr() as *mut libc::c_char;
    // SAFETY: a valid C string and a buffer of the given length.
    let r = unsafe {
        if follow {
            libc::listxattr(c.as_ptr(), ptr, buf.len())
        } else {
            libc::llistxattr(c.as_ptr(), ptr, buf.len())
        }
    };
    if r < 0 {
        return Err(last_errno());
    }
    let mut names: Vec<String> = buf[..r as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .filter(|s| !s.starts_with("security."))
        .collect();
    names.sort();
    Ok(names)
}

/// Deterministic contents for a write: all zeros for `fill == 0`, else a pseudo-random stream.
fn data(fill: u32, len: usize) -> Vec<u8> {
    if fill == 0 {
        return vec![0; len];
    }
    let mut x = u64::from(fill).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

// ------------------------------------------------------------------------------------------
// One side of the comparison: a root directory and the file descriptors held open in it
// ------------------------------------------------------------------------------------------

struct World {
    root: PathBuf,
    fds: Vec<Option<File>>,
    /// The path each slot was opened with (only for statistics about detached fds).
    fd_paths: Vec<Option<String>>,
}

impl World {
    fn new(root: PathBuf) -> World {
        World {
            root,
            fds: (0..SLOTS).map(|_| None).collect(),
            fd_paths: vec![None; SLOTS],
        }
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn open_slots(&self) -> [bool; SLOTS] {
        let mut open = [false; SLOTS];
        for (o, fd) in open.iter_mut().zip(&self.fds) {
            *o = fd.is_some();
        }
        open
    }

    fn fd(&self, slot: usize) -> Result<&File, i32> {
        self.fds[slot].as_ref().ok_or(libc::EBADF)
    }

    fn apply(&mut self, op: &Op) -> Outcome {
        match op {
            Op::Write {
                path,
                offset,
                len,
                fill,
                trunc,
                excl,
                fsync,
            } => {
                let mut flags = libc::O_WRONLY | libc::O_CREAT;
                if *trunc {
                    flags |= libc::O_TRUNC;
                }
                if *excl {
                    flags |= libc::O_EXCL;
                }
                let f = open_raw(&self.p(path), flags, 0o644)?;
                f.write_all_at(&data(*fill, *len), *offset).map_err(os)?;
                if *fsync {
                    f.sync_all().map_err(os)?;
                }
                close_checked(f)?;
                Ok(Val::Count(*len as u64))
            }
            Op::Append { path, len, fill } => {
                let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND;
                let mut f = open_raw(&self.p(path), flags, 0o644)?;
                f.write_all(&data(*fill, *len)).map_err(os)?;
                let size = f.metadata().map_err(os)?.len();
                close_checked(f)?;
                Ok(Val::Count(size))
            }
            Op::Read { path, offset, len } => {
                let f = open_raw(&self.p(path), libc::O_RDONLY, 0)?;
                let bytes = read_range(&f, *offset, *len)?;
                close_checked(f)?;
                Ok(Val::Bytes(bytes))
            }
            Op::Truncate { path, size } => {
                let c = cpath(&self.p(path));
                // SAFETY: valid C string.
                check(unsafe { libc::truncate(c.as_ptr(), *size as libc::off_t) })
            }
            Op::Rename { from, to, flags } => {
                let (a, b) = (cpath(&self.p(from)), cpath(&self.p(to)));
                if *flags == 0 {
                    // SAFETY: valid C strings.
                    check(unsafe { libc::rename(a.as_ptr(), b.as_ptr()) })
                } else {
                    // SAFETY: renameat2(AT_FDCWD, old, AT_FDCWD, new, flags) with valid strings.
                    let r = unsafe {
                        libc::syscall(
                            libc::SYS_renameat2,
                            libc::AT_FDCWD,
                            a.as_ptr(),
                            libc::AT_FDCWD,
                            b.as_ptr(),
                            *flags,
                        )
                    };
                    check(if r < 0 { -1 } else { 0 })
                }
            }
            Op::Link { from, to } => {
                let (a, b) = (cpath(&self.p(from)), cpath(&self.p(to)));
                // SAFETY: valid C strings.
                check(unsafe { libc::link(a.as_ptr(), b.as_ptr()) })
            }
            Op::Symlink { target, path } => {
                let (t, p) = (cstr(target), cpath(&self.p(path)));
                // SAFETY: valid C strings.
                check(unsafe { libc::symlink(t.as_ptr(), p.as_ptr()) })
            }
            Op::Readlink { path } => {
                let t = fs::read_link(self.p(path)).map_err(os)?;
                Ok(Val::Text(t.to_string_lossy().into_owned()))
            }
            Op::Chmod { path, mode } => {
                let c = cpath(&self.p(path));
                // SAFETY: valid C string.
                check(unsafe { libc::chmod(c.as_ptr(), *mode as libc::mode_t) })
            }
            Op::Mkdir { path, mode } => {
                let c = cpath(&self.p(path));
                // SAFETY: valid C string.
                check(unsafe { libc::mkdir(c.as_ptr(), *mode as libc::mode_t) })
            }
            Op::Rmdir { path } => {
                let c = cpath(&self.p(path));
                // SAFETY: valid C string.
                check(unsafe { libc::rmdir(c.as_ptr()) })
            }
            Op::Unlink { path } => {
                let c = cpath(&self.p(path));
                // SAFETY: valid C string.
                check(unsafe { libc::unlink(c.as_ptr()) })
            }
            Op::SetXattr {
                path,
                name,
                len,
                fill,
                flags,
            } => {
                let (c, n) = (cpath(&self.p(path)), cstr(name));
                let value = data(*fill, *len);
                let ptr = value.as_ptr() as *const libc::c_void;
                // SAFETY: valid C strings and a value buffer of the given length.
                check(unsafe { libc::setxattr(c.as_ptr(), n.as_ptr(), ptr, value.len(), *flags) })
            }
            Op::GetXattr { path, name } => Ok(Val::Bytes(xattr_get(&self.p(path), name, true)?)),
            Op::ListXattr { path } => Ok(Val::Names(xattr_list(&self.p(path), true)?)),
            Op::RemoveXattr { path, name } => {
                let (c, n) = (cpath(&self.p(path)), cstr(name));
                // SAFETY: valid C strings.
                check(unsafe { libc::removexattr(c.as_ptr(), n.as_ptr()) })
            }
            Op::Stat { path, follow } => {
                let p = self.p(path);
                let md = if *follow {
                    fs::metadata(p)
                } else {
                    fs::symlink_metadata(p)
                };
                Ok(Val::Meta(meta_of(&md.map_err(os)?)))
            }
            Op::ReadDir { path } => {
                let mut names = Vec::new();
                for ent in fs::read_dir(self.p(path)).map_err(os)? {
                    names.push(ent.map_err(os)?.file_name().to_string_lossy().into_owned());
                }
                names.sort();
                Ok(Val::Names(names))
            }
            Op::FdOpen { slot, path, flags } => {
                if let Some(old) = self.fds[*slot].take() {
                    close_checked(old)?;
                }
                self.fds[*slot] = Some(open_raw(&self.p(path), *flags, 0o644)?);
                self.fd_paths[*slot] = Some(path.clone());
                Ok(Val::Unit)
            }
            Op::FdWrite {
                slot,
                offset,
                len,
                fill,
            } => {
                let f = self.fd(*slot)?;
                f.write_all_at(&data(*fill, *len), *offset).map_err(os)?;
                Ok(Val::Count(*len as u64))
            }
            Op::FdRead { slot, offset, len } => {
                Ok(Val::Bytes(read_range(self.fd(*slot)?, *offset, *len)?))
            }
            Op::FdTruncate { slot, size } => {
                self.fd(*slot)?.set_len(*size).map_err(os)?;
                Ok(Val::Unit)
            }
            Op::FdSync { slot, data_only } => {
                let f = self.fd(*slot)?;
                if *data_only {
                    f.sync_data()
                } else {
                    f.sync_all()
                }
                .map_err(os)?;
                Ok(Val::Unit)
            }
            Op::FdStat { slot } => Ok(Val::Meta(meta_of(&self.fd(*slot)?.metadata().map_err(os)?))),
            Op::FdClose { slot } => {
                let f = self.fds[*slot].take().ok_or(libc::EBADF)?;
                close_checked(f)?;
                Ok(Val::Unit)
            }
        }
    }
}

// ------------------------------------------------------------------------------------------
// Random operation generation, driven by the state of the reference tree
// ------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    File,
    Dir,
    Link,
}

/// The entries of the reference tree (symlinks not followed), sorted, so that generation is
/// deterministic.
struct Snapshot {
    entries: Vec<(String, Kind)>,
    /// (path, xattr name) for every user xattr set on a file or directory.
    xattrs: Vec<(String, String)>,
}

fn depth(rel: &str) -> usize {
    if rel.is_empty() {
        0
    } else {
        rel.matches('/').count() + 1
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

impl Snapshot {
    fn scan(root: &Path) -> Snapshot {
        let (mut entries, mut xattrs) = (Vec::new(), Vec::new());
        let mut stack = vec![String::new()];
        while let Some(dir) = stack.pop() {
            let rd = fs::read_dir(root.join(&dir)).expect("scan reference tree");
            for ent in rd {
                let ent = ent.expect("scan reference tree");
                let rel = join(&dir, &ent.file_name().to_string_lossy());
                let ft = ent.file_type().expect("file type");
                let kind = if ft.is_dir() {
                    stack.push(rel.clone());
                    Kind::Dir
                } else if ft.is_symlink() {
                    Kind::Link
                } else {
                    Kind::File
                };
                if kind != Kind::Link {
                    let names = xattr_list(&root.join(&rel), false).expect("list xattrs");
                    xattrs.extend(names.into_iter().map(|n| (rel.clone(), n)));
                }
                entries.push((rel, kind));
            }
        }
        entries.sort();
        xattrs.sort();
        Snapshot { entries, xattrs }
    }

    fn of(&self, kind: Option<Kind>) -> Vec<&str> {
        self.entries
            .iter()
            .filter(|(_, k)| kind.is_none_or(|want| *k == want))
            .map(|(p, _)| p.as_str())
            .collect()
    }
}

struct Gen<'a> {
    rng: StdRng,
    snap: &'a Snapshot,
}

const MODES: [u32; 9] = [
    0o644, 0o600, 0o755, 0o700, 0o444, 0o555, 0o777, 0o000, 0o1777,
];
const DIR_MODES: [u32; 4] = [0o755, 0o700, 0o775, 0o777];

#[derive(Clone, Copy)]
enum K {
    Write,
    Append,
    Read,
    Truncate,
    Rename,
    RenameIntoSelf,
    RenameNoReplace,
    RenameExchange,
    Link,
    Symlink,
    Readlink,
    Chmod,
    Mkdir,
    Rmdir,
    Unlink,
    SetXattr,
    GetXattr,
    ListXattr,
    RemoveXattr,
    Stat,
    ReadDir,
    FdOpen,
    FdWrite,
    FdRead,
    FdTruncate,
    FdSync,
    FdStat,
    FdClose,
}

const WEIGHTS: [(K, u32); 28] = [
    (K::Write, 14),
    (K::Append, 4),
    (K::Read, 8),
    (K::Truncate, 5),
    (K::Rename, 7),
    (K::RenameIntoSelf, 1),
    (K::RenameNoReplace, 3),
    (K::RenameExchange, 3),
    (K::Link, 4),
    (K::Symlink, 3),
    (K::Readlink, 2),
    (K::Chmod, 3),
    (K::Mkdir, 7),
    (K::Rmdir, 4),
    (K::Unlink, 6),
    (K::SetXattr, 4),
    (K::GetXattr, 3),
    (K::ListXattr, 2),
    (K::RemoveXattr, 2),
    (K::Stat, 3),
    (K::ReadDir, 2),
    (K::FdOpen, 5),
    (K::FdWrite, 7),
    (K::FdRead, 4),
    (K::FdTruncate, 2),
    (K::FdSync, 2),
    (K::FdStat, 2),
    (K::FdClose, 2),
];

impl Gen<'_> {
    fn pct(&mut self, p: u32) -> bool {
        self.rng.gen_range(0..100) < p
    }

    fn name(&mut self) -> &'static str {
        NAMES.choose(&mut self.rng).unwrap()
    }

    fn existing(&mut self, kind: Option<Kind>) -> Option<String> {
        self.snap
            .of(kind)
            .choose(&mut self.rng)
            .map(|s| s.to_string())
    }

    /// An existing directory (or the root) not too deep, plus a random name.
    fn new_path(&mut self) -> String {
        let mut dirs = vec![""];
        dirs.extend(
            self.snap
                .of(Some(Kind::Dir))
                .into_iter()
                .filter(|d| depth(d) < MAX_DEPTH),
        );
        let dir = dirs.choose(&mut self.rng).unwrap().to_string();
        join(&dir, self.name())
    }

    fn random_path(&mut self) -> String {
        let n = self.rng.gen_range(1..=MAX_DEPTH);
        (0..n).map(|_| self.name()).collect::<Vec<_>>().join("/")
    }

    fn any_path(&mut self) -> String {
        let r = self.rng.gen_range(0..100);
        if r < 45 {
            if let Some(p) = self.existing(None) {
                return p;
            }
        }
        if r < 88 {
            self.new_path()
        } else {
            self.random_path()
        }
    }

    /// With probability `p` percent an existing entry of `kind`, else any path.
    fn path(&mut self, kind: Option<Kind>, p: u32) -> String {
        if self.pct(p) {
            if let Some(x) = self.existing(kind) {
                return x;
            }
        }
        self.any_path()
    }

    /// Offsets and sizes: small, near 1 MiB multiples (both sides), or anywhere up to 3 MiB.
    fn offset(&mut self) -> u64 {
        match self.rng.gen_range(0..10) {
            0 => 0,
            1..=3 => self.rng.gen_range(0..300_000),
            4..=7 => {
                let base = self.rng.gen_range(1..=2) * MIB;
                base - self.rng.gen_range(0..150_000) + self.rng.gen_range(0..100_000)
            }
            8 => self.rng.gen_range(0..3) * MIB + self.rng.gen_range(0..4) * 4096,
            _ => self.rng.gen_range(0..3 * MIB),
        }
    }

    fn len(&mut self) -> usize {
        match self.rng.gen_range(0..10) {
            0 => 0,
            1..=4 => self.rng.gen_range(1..4096),
            5..=8 => self.rng.gen_range(4096..=MAX_LEN),
            _ => MAX_LEN,
        }
    }

    fn read_len(&mut self) -> usize {
        if self.pct(15) {
            4 * MIB as usize
        } else {
            self.len().max(1)
        }
    }

    fn fill(&mut self) -> u32 {
        if self.pct(12) {
            0
        } else {
            self.rng.gen::<u32>() | 1
        }
    }

    /// A relative target that only goes downwards, so it resolves inside the tree wherever the
    /// link is moved later; sometimes dangling, sometimes the link itself (ELOOP).
    fn target(&mut self, link: &str) -> String {
        match self.rng.gen_range(0..10) {
            0..=5 => self.path(None, 100),
            6..=8 => self.name().to_string(),
            _ => link.rsplit('/').next().unwrap().to_string(),
        }
    }

    fn slot(&mut self, open: &[bool; SLOTS], want_open: bool) -> usize {
        let matching: Vec<usize> = (0..SLOTS).filter(|&s| open[s] == want_open).collect();
        if self.pct(85) {
            if let Some(&s) = matching.choose(&mut self.rng) {
                return s;
            }
        }
        self.rng.gen_range(0..SLOTS)
    }

    fn xattr_name(&mut self) -> &'static str {
        XATTR_NAMES.choose(&mut self.rng).unwrap()
    }

    /// Mostly a path and name that has an xattr, else a random path and name.
    fn xattr_target(&mut self) -> (String, &'static str) {
        if self.pct(70) {
            if let Some((path, name)) = self.snap.xattrs.choose(&mut self.rng) {
                let name = XATTR_NAMES
                    .iter()
                    .find(|n| *n == name)
                    .expect("known xattr name");
                return (path.clone(), name);
            }
        }
        (self.path(None, 85), self.xattr_name())
    }

    fn op(&mut self, open: &[bool; SLOTS]) -> Op {
        let total: u32 = WEIGHTS.iter().map(|w| w.1).sum();
        let mut r = self.rng.gen_range(0..total);
        let mut kind = WEIGHTS[0].0;
        for (k, w) in WEIGHTS {
            if r < w {
                kind = k;
                break;
            }
            r -= w;
        }
        let fd_op = matches!(
            kind,
            K::FdWrite | K::FdRead | K::FdTruncate | K::FdSync | K::FdStat | K::FdClose
        );
        if fd_op && !open.contains(&true) && self.pct(85) {
            // Nothing is open (e.g. right after a remount): mostly open something instead.
            kind = K::FdOpen;
        }
        let file = Some(Kind::File);
        let dir = Some(Kind::Dir);
        match kind {
            K::Write => Op::Write {
                path: self.path(file, 65),
                offset: self.offset(),
                len: self.len(),
                fill: self.fill(),
                trunc: self.pct(12),
                excl: self.pct(8),
                fsync: self.pct(15),
            },
            K::Append => Op::Append {
                path: self.path(file, 75),
                len: self.len(),
                fill: self.fill(),
            },
            K::Read => Op::Read {
                path: self.path(file, 85),
                offset: if self.pct(30) { 0 } else { self.offset() },
                len: self.read_len(),
            },
            K::Truncate => Op::Truncate {
                path: self.path(file, 85),
                size: if self.pct(15) { 0 } else { self.offset() },
            },
            K::Rename => {
                let from = match self.rng.gen_range(0..4) {
                    0 | 1 => self.path(file, 80),
                    2 => self.path(dir, 80),
                    _ => self.any_path(),
                };
                let to = match self.rng.gen_range(0..4) {
                    0 => self.new_path(),
                    1 => self.path(file, 90),
                    2 => self.path(dir, 90),
                    _ => self.any_path(),
                };
                Op::Rename { from, to, flags: 0 }
            }
            K::RenameIntoSelf => {
                let from = self.path(dir, 90);
                let to = join(&from, self.name());
                Op::Rename { from, to, flags: 0 }
            }
            K::RenameNoReplace => {
                let from = self.path(None, 85);
                let to = if self.pct(50) {
                    self.new_path()
                } else {
                    self.path(None, 90)
                };
                Op::Rename {
                    from,
                    to,
                    flags: libc::RENAME_NOREPLACE,
                }
            }
            K::RenameExchange => {
                let from = self.path(None, 90);
                let to = self.path(None, 90);
                Op::Rename {
                    from,
                    to,
                    flags: libc::RENAME_EXCHANGE,
                }
            }
            K::Link => {
                let from = if self.pct(15) {
                    self.path(Some(Kind::Link), 90)
                } else {
                    self.path(file, 80)
                };
                let to = if self.pct(75) {
                    self.new_path()
                } else {
                    self.any_path()
                };
                Op::Link { from, to }
            }
            K::Symlink => {
                let path = if self.pct(80) {
                    self.new_path()
                } else {
                    self.any_path()
                };
                let target = self.target(&path);
                Op::Symlink { target, path }
            }
            K::Readlink => Op::Readlink {
                path: self.path(Some(Kind::Link), 85),
            },
            K::Chmod => Op::Chmod {
                path: self.path(None, 85),
                mode: *MODES.choose(&mut self.rng).unwrap(),
            },
            K::Mkdir => Op::Mkdir {
                path: if self.pct(80) {
                    self.new_path()
                } else {
                    self.any_path()
                },
                mode: *DIR_MODES.choose(&mut self.rng).unwrap(),
            },
            K::Rmdir => Op::Rmdir {
                path: self.path(dir, 80),
            },
            K::Unlink => Op::Unlink {
                path: self.path(None, 85),
            },
            K::SetXattr => {
                let (path, name) = if self.pct(40) {
                    self.xattr_target()
                } else {
                    (self.path(None, 85), self.xattr_name())
                };
                // Values stay under 1000 bytes: ext4 keeps all of an inode's xattrs in one
                // 4 KiB block and answers ENOSPC beyond that, which is not a mirrorfs bug.
                let len = match self.rng.gen_range(0..10) {
                    0 => 0,
                    1..=7 => self.rng.gen_range(1..64),
                    _ => self.rng.gen_range(64..1000),
                };
                let flags = match self.rng.gen_range(0..5) {
                    0 => libc::XATTR_CREATE,
                    1 => libc::XATTR_REPLACE,
                    _ => 0,
                };
                Op::SetXattr {
                    path,
                    name,
                    len,
                    fill: self.fill(),
                    flags,
                }
            }
            K::GetXattr => {
                let (path, name) = self.xattr_target();
                Op::GetXattr { path, name }
            }
            K::ListXattr => Op::ListXattr {
                path: self.path(None, 85),
            },
            K::RemoveXattr => {
                let (path, name) = self.xattr_target();
                Op::RemoveXattr { path, name }
            }
            K::Stat => Op::Stat {
                path: self.path(None, 85),
                follow: self.pct(30),
            },
            K::ReadDir => Op::ReadDir {
                path: if self.pct(30) {
                    String::new()
                } else {
                    self.path(dir, 85)
                },
            },
            K::FdOpen => {
                let slot = self.slot(open, false);
                let path = self.path(file, 75);
                let mut flags = if self.pct(15) {
                    libc::O_RDONLY
                } else {
                    libc::O_RDWR
                };
                if self.pct(50) {
                    flags |= libc::O_CREAT;
                }
                if flags & libc::O_ACCMODE == libc::O_RDWR {
                    if self.pct(20) {
                        flags |= libc::O_APPEND;
                    }
                    if self.pct(8) {
                        flags |= libc::O_TRUNC;
                    }
                }
                Op::FdOpen { slot, path, flags }
            }
            K::FdWrite => Op::FdWrite {
                slot: self.slot(open, true),
                offset: self.offset(),
                len: self.len(),
                fill: self.fill(),
            },
            K::FdRead => Op::FdRead {
                slot: self.slot(open, true),
                offset: if self.pct(30) { 0 } else { self.offset() },
                len: self.read_len(),
            },
            K::FdTruncate => Op::FdTruncate {
                slot: self.slot(open, true),
                size: if self.pct(15) { 0 } else { self.offset() },
            },
            K::FdSync => Op::FdSync {
                slot: self.slot(open, true),
                data_only: self.pct(30),
            },
            K::FdStat => Op::FdStat {
                slot: self.slot(open, true),
            },
            K::FdClose => Op::FdClose {
                slot: self.slot(open, true),
            },
        }
    }
}

// ------------------------------------------------------------------------------------------
// Whole-tree comparison
// ------------------------------------------------------------------------------------------

struct Entry {
    meta: Meta,
    ino: u64,
    target: Option<String>,
    /// user-visible xattrs (not following symlinks); only collected for full comparisons.
    xattrs: Option<Vec<(String, Vec<u8>)>>,
}

fn collect(root: &Path, full: bool) -> Result<BTreeMap<String, Entry>, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![String::new()];
    while let Some(dir) = stack.pop() {
        let dpath = root.join(&dir);
        let rd = fs::read_dir(&dpath).map_err(|e| format!("readdir {dir:?}: {e}"))?;
        for ent in rd {
            let ent = ent.map_err(|e| format!("readdir {dir:?}: {e}"))?;
            let rel = join(&dir, &ent.file_name().to_string_lossy());
            let p = root.join(&rel);
            let md = fs::symlink_metadata(&p).map_err(|e| format!("lstat {rel}: {e}"))?;
            let meta = meta_of(&md);
            let target = if meta.kind == 'l' {
                let t = fs::read_link(&p).map_err(|e| format!("readlink {rel}: {e}"))?;
                Some(t.to_string_lossy().into_owned())
            } else {
                None
            };
            let xattrs = if full {
                let err = |e: i32| format!("xattrs of {rel}: {}", errno_name(e));
                let mut v = Vec::new();
                for name in xattr_list(&p, false).map_err(err)? {
                    let value = xattr_get(&p, &name, false).map_err(err)?;
                    v.push((name, value));
                }
                Some(v)
            } else {
                None
            };
            if meta.kind == 'd' {
                stack.push(rel.clone());
            }
            out.insert(
                rel,
                Entry {
                    meta,
                    ino: md.ino(),
                    target,
                    xattrs,
                },
            );
        }
    }
    Ok(out)
}

/// Groups of paths that are hard links to one inode.
fn link_groups(tree: &BTreeMap<String, Entry>) -> BTreeSet<Vec<String>> {
    let mut by_ino: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (path, e) in tree {
        if e.meta.kind != 'd' {
            by_ino.entry(e.ino).or_default().push(path.clone());
        }
    }
    by_ino.into_values().filter(|g| g.len() > 1).collect()
}

/// Compares two trees: names, types, modes, sizes and link counts of non-directories, symlink
/// targets, and with `full` also file contents, xattrs and hard-link groups. Directory sizes,
/// directory link counts, times and inode numbers are not compared.
fn compare_trees(a: &Path, b: &Path, names: [&str; 2], full: bool) -> Result<(), String> {
    let ta = collect(a, full).map_err(|e| format!("walking {}: {e}", names[0]))?;
    let tb = collect(b, full).map_err(|e| format!("walking {}: {e}", names[1]))?;
    let mut diffs = Vec::new();
    for k in ta.keys().filter(|k| !tb.contains_key(*k)) {
        diffs.push(format!("{k}: only in {} ({})", names[0], ta[k].meta));
    }
    for k in tb.keys().filter(|k| !ta.contains_key(*k)) {
        diffs.push(format!("{k}: only in {} ({})", names[1], tb[k].meta));
    }
    for (k, ea) in &ta {
        let Some(eb) = tb.get(k) else { continue };
        if ea.meta != eb.meta {
            diffs.push(format!(
                "{k}: {} {} vs {} {}",
                names[0], ea.meta, names[1], eb.meta
            ));
        }
        if ea.target != eb.target {
            diffs.push(format!(
                "{k}: symlink target {} {:?} vs {} {:?}",
                names[0], ea.target, names[1], eb.target
            ));
        }
        if ea.xattrs != eb.xattrs {
            let show = |x: &Option<Vec<(String, Vec<u8>)>>| {
                let v = x.as_deref().unwrap_or_default();
                v.iter()
                    .map(|(n, v)| format!("{n}={}b/{:x}", v.len(), fnv(v)))
                    .collect::<Vec<_>>()
            };
            diffs.push(format!(
                "{k}: xattrs {} {:?} vs {} {:?}",
                names[0],
                show(&ea.xattrs),
                names[1],
                show(&eb.xattrs)
            ));
        }
        if full && ea.meta.kind == 'f' && eb.meta.kind == 'f' {
            let ca = fs::read(a.join(k)).map_err(|e| format!("{}: read {k}: {e}", names[0]))?;
            let cb = fs::read(b.join(k)).map_err(|e| format!("{}: read {k}: {e}", names[1]))?;
            if ca != cb {
                diffs.push(format!(
                    "{k}: contents differ: {}",
                    bytes_diff(&ca, &cb, names)
                ));
            }
        }
    }
    if full {
        let (ga, gb) = (link_groups(&ta), link_groups(&tb));
        if ga != gb {
            diffs.push(format!(
                "hard-link groups {} {ga:?} vs {} {gb:?}",
                names[0], names[1]
            ));
        }
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(diffs.join("\n"))
    }
}

/// Both trees as listed by `common::tree_manifest` (directory sizes included, so they may
/// differ where `compare_trees` does not), for the failure message.
fn manifests(a: &Path, b: &Path, names: [&str; 2]) -> String {
    let manifest = |root: &Path| {
        let root = root.to_path_buf();
        std::panic::catch_unwind(move || common::tree_manifest(&root))
            .unwrap_or_else(|_| "(tree_manifest failed)\n".to_string())
    };
    format!(
        "\n--- tree_manifest of {} ---\n{}--- tree_manifest of {} ---\n{}",
        names[0],
        manifest(a),
        names[1],
        manifest(b)
    )
}

// ------------------------------------------------------------------------------------------
// The engine: applies ops to both worlds and compares
// ------------------------------------------------------------------------------------------

/// State shared with the watchdog thread.
struct Shared {
    label: String,
    log: Vec<String>,
    current: Option<String>,
    since: Instant,
}

#[derive(Default)]
struct Stats {
    /// op kind -> (successes, errors)
    ops: BTreeMap<&'static str, (u32, u32)>,
    /// errno -> how often an operation failed with it
    errnos: BTreeMap<i32, u32>,
    /// I/O through an fd whose file was unlinked / whose path now names something else.
    fd_io_unlinked: u32,
    fd_io_moved: u32,
    full_checks: u32,
}

impl Stats {
    fn merge(&mut self, other: &Stats) {
        for (k, (ok, err)) in &other.ops {
            let e = self.ops.entry(k).or_default();
            e.0 += ok;
            e.1 += err;
        }
        for (e, n) in &other.errnos {
            *self.errnos.entry(*e).or_default() += n;
        }
        self.fd_io_unlinked += other.fd_io_unlinked;
        self.fd_io_moved += other.fd_io_moved;
        self.full_checks += other.full_checks;
    }

    fn ok(&self, kind: &str) -> u32 {
        self.ops.get(kind).map_or(0, |c| c.0)
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .ops
            .iter()
            .map(|(k, (ok, err))| format!("{k} {ok}/{err}"))
            .collect();
        write!(f, "ops (ok/err): {}", parts.join(", "))?;
        let errs: Vec<String> = self
            .errnos
            .iter()
            .map(|(e, n)| format!("{} {n}", errno_name(*e)))
            .collect();
        write!(f, "\nerrors: {}", errs.join(", "))?;
        write!(
            f,
            "\nfd I/O after unlink: {}, after rename/replace: {}; full tree checks: {}",
            self.fd_io_unlinked, self.fd_io_moved, self.full_checks
        )
    }
}

struct Diff {
    names: [&'static str; 2],
    worlds: [World; 2],
    shared: Arc<Mutex<Shared>>,
    step: usize,
    stats: Stats,
}

impl Diff {
    fn new(label: String, names: [&'static str; 2], a: PathBuf, b: PathBuf) -> Diff {
        let shared = Shared {
            label,
            log: Vec::new(),
            current: None,
            since: Instant::now(),
        };
        Diff {
            names,
            worlds: [World::new(a), World::new(b)],
            shared: Arc::new(Mutex::new(shared)),
            step: 0,
            stats: Stats::default(),
        }
    }

    fn note(&self, line: String) {
        let mut sh = self.shared.lock().unwrap();
        sh.log.push(line);
        sh.current = None;
        sh.since = Instant::now();
    }

    fn report(&self, what: &str) -> String {
        let sh = self.shared.lock().unwrap();
        format!(
            "differential mismatch: {}, step {}\n{what}\n--- op log so far ({} lines; step op => \
             result) ---\n{}\n--- end of op log ---",
            sh.label,
            self.step.saturating_sub(1),
            sh.log.len(),
            sh.log.join("\n")
        )
    }

    /// Generates the next op from `step_seed` and the reference tree, then runs it.
    fn step(&mut self, step_seed: u64) -> Result<(), String> {
        let snap = Snapshot::scan(&self.worlds[0].root);
        let open = self.worlds[0].open_slots();
        let op = Gen {
            rng: StdRng::seed_from_u64(step_seed),
            snap: &snap,
        }
        .op(&open);
        self.run(op)
    }

    fn count_detached_io(&mut self, op: &Op) {
        let slot = match op {
            Op::FdWrite { slot, .. } | Op::FdRead { slot, .. } => *slot,
            _ => return,
        };
        let w = &self.worlds[0];
        let (Some(f), Some(path)) = (&w.fds[slot], &w.fd_paths[slot]) else {
            return;
        };
        let Ok(md) = f.metadata() else { return };
        if md.nlink() == 0 {
            self.stats.fd_io_unlinked += 1;
        } else if fs::metadata(w.p(path)).map(|m| m.ino()).ok() != Some(md.ino()) {
            self.stats.fd_io_moved += 1;
        }
    }

    fn run(&mut self, op: Op) -> Result<(), String> {
        let n = self.step;
        self.step += 1;
        self.count_detached_io(&op);
        {
            let mut sh = self.shared.lock().unwrap();
            sh.current = Some(format!("{n:4} {op}"));
            sh.since = Instant::now();
        }
        let ra = self.worlds[0].apply(&op);
        let rb = self.worlds[1].apply(&op);
        let counter = self.stats.ops.entry(op.kind()).or_default();
        match ra {
            Ok(_) => counter.0 += 1,
            Err(e) => {
                counter.1 += 1;
                *self.stats.errnos.entry(e).or_default() += 1;
            }
        }
        let [na, nb] = self.names;
        if ra == rb {
            self.note(format!("{n:4} {op} => {}", show(&ra)));
        } else {
            self.note(format!(
                "{n:4} {op} => {na}: {} / {nb}: {}",
                show(&ra),
                show(&rb)
            ));
            let mut what = format!("op: {op}\n{na:>9}: {}\n{nb:>9}: {}", show(&ra), show(&rb));
            if let (Ok(Val::Bytes(a)), Ok(Val::Bytes(b))) = (&ra, &rb) {
                what.push_str(&format!("\n{}", bytes_diff(a, b, self.names)));
            }
            return Err(self.report(&what));
        }
        let full = (n + 1).is_multiple_of(FULL_CHECK_EVERY);
        self.check_trees(full, &format!("after step {n} ({op})"))
    }

    fn check_trees(&mut self, full: bool, when: &str) -> Result<(), String> {
        if full {
            self.stats.full_checks += 1;
        }
        {
            let mut sh = self.shared.lock().unwrap();
            sh.current = Some(format!("tree comparison {when}"));
            sh.since = Instant::now();
        }
        let (a, b) = (&self.worlds[0].root, &self.worlds[1].root);
        let res = compare_trees(a, b, self.names, full).map_err(|d| {
            let kind = if full { "full" } else { "metadata" };
            let mut what = format!("{kind} tree comparison failed {when}:\n{d}");
            if full {
                what.push_str(&manifests(a, b, self.names));
            }
            self.report(&what)
        });
        self.shared.lock().unwrap().current = None;
        res
    }

    /// Closes every fd still open (as logged, compared operations).
    fn close_all(&mut self) -> Result<(), String> {
        for slot in 0..SLOTS {
            if self.worlds.iter().any(|w| w.fds[slot].is_some()) {
                self.run(Op::FdClose { slot })?;
            }
        }
        Ok(())
    }
}

/// Prints the op log to the real stderr (not the captured one) when a step hangs, so that a
/// deadlock in the filesystem can be diagnosed even though the test never finishes.
struct Watchdog {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn start(shared: Arc<Mutex<Shared>>) -> Watchdog {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut reported = false;
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(250));
                let sh = shared.lock().unwrap();
                let hung = sh.current.is_some() && sh.since.elapsed() > HANG_LIMIT;
                if hung && !reported {
                    let _ = writeln!(
                        io::stderr(),
                        "differential WATCHDOG: {}: no progress for {:?} in step\n{}\nop log:\n{}",
                        sh.label,
                        sh.since.elapsed(),
                        sh.current.as_deref().unwrap_or(""),
                        sh.log.join("\n")
                    );
                }
                reported = hung;
            }
        });
        Watchdog {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn unmount_checked(mount: common::Mount) -> Result<(), String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || mount.unmount())).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unmount panicked".to_string())
    })
}

/// Runs `steps` in segments of [`REMOUNT_EVERY`], then `steps_after`. After each segment
/// every fd is closed, the full trees are compared, the filesystem is unmounted and mounted
/// again, and the full trees are compared once more (persistence); the last segment ends with
/// a final comparison and a clean unmount.
fn run_mirrorfs_case(label: String, steps: &[u64], steps_after: &[u64]) -> Result<Stats, String> {
    let fx = Fixture::new(2);
    let native = fx.path("native");
    fs::create_dir(&native).expect("create native dir");

    // Declared before `diff`, so that on an early return `diff` (and the fds it holds, which
    // would keep the mount busy) is dropped first.
    let mut mount = fx.mount();
    let mut diff = Diff::new(label, ["native", "mirrorfs"], native, fx.mnt.clone());
    let _watchdog = Watchdog::start(diff.shared.clone());
    let segments = steps
        .chunks(REMOUNT_EVERY)
        .chain(std::iter::once(steps_after));
    for (i, segment) in segments.enumerate() {
        if i > 0 {
            diff.note("---- unmount, mount again ----".to_string());
            unmount_checked(mount).map_err(|e| diff.report(&format!("unmount failed: {e}")))?;
            mount = fx.mount();
            diff.check_trees(true, "after unmount and mount again")?;
        }
        for &s in segment {
            diff.step(s)?;
        }
        diff.close_all()?;
        diff.check_trees(true, "after closing every fd")?;
    }
    unmount_checked(mount).map_err(|e| diff.report(&format!("final unmount failed: {e}")))?;
    Ok(std::mem::take(&mut diff.stats))
}

fn step_seeds(seed: u64, ops: usize) -> (Vec<u64>, Vec<u64>) {
    let mut master = StdRng::seed_from_u64(seed);
    let steps = (0..ops).map(|_| master.gen()).collect();
    let after = (0..OPS_AFTER_REMOUNT).map(|_| master.gen()).collect();
    (steps, after)
}

// ------------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------------

#[test]
fn differential_mirrorfs_vs_native() {
    let (seeds, ops) = config();
    let started = Instant::now();
    let mut total = Stats::default();
    let mut failures = Vec::new();
    for &seed in &seeds {
        let t = Instant::now();
        let (steps, after) = step_seeds(seed, ops);
        let label =
            format!("seed {seed} (reproduce: MIRRORFS_DIFF_SEED={seed} MIRRORFS_DIFF_OPS={ops})");
        match run_mirrorfs_case(label, &steps, &after) {
            Ok(stats) => {
                eprintln!(
                    "seed {seed}: ok, {ops}+{OPS_AFTER_REMOUNT} ops in {:.1?}",
                    t.elapsed()
                );
                total.merge(&stats);
            }
            Err(report) => {
                eprintln!("seed {seed}: FAILED after {:.1?}\n{report}\n", t.elapsed());
                failures.push((seed, report));
            }
        }
    }
    eprintln!(
        "{} seeds in {:.1?}\n{total}",
        seeds.len(),
        started.elapsed()
    );
    if let Some((_, first)) = failures.first() {
        let failed: Vec<u64> = failures.iter().map(|f| f.0).collect();
        panic!(
            "{} of {} seeds failed: {failed:?}\nfirst failure:\n{first}",
            failed.len(),
            seeds.len()
        );
    }
}

/// Runs the engine with two native directories: every result must agree, and the generator
/// must actually reach the interesting cases. Also checks that the comparator notices
/// differences.
#[test]
fn differential_engine_self_check() {
    let dir = tempfile::Builder::new()
        .prefix("mirrorfs-diff-self-")
        .tempdir()
        .unwrap();
    let mut total = Stats::default();
    for seed in [101, 102, 103] {
        let (a, b) = (
            dir.path().join(format!("{seed}-a")),
            dir.path().join(format!("{seed}-b")),
        );
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        let (steps, after) = step_seeds(seed, DEFAULT_OPS);
        let mut diff = Diff::new(
            format!("self-check seed {seed}"),
            ["native-a", "native-b"],
            a,
            b,
        );
        let res = (|| {
            for s in steps.iter().chain(&after) {
                diff.step(*s)?;
            }
            diff.close_all()?;
            diff.check_trees(true, "at the end")
        })();
        if let Err(report) = res {
            panic!("{report}");
        }
        total.merge(&diff.stats);
    }
    eprintln!("{total}");
    for kind in [
        "write",
        "append",
        "read",
        "truncate",
        "rename",
        "rename-noreplace",
        "rename-exchange",
        "link",
        "symlink",
        "readlink",
        "mkdir",
        "rmdir",
        "unlink",
        "setxattr",
        "getxattr",
        "removexattr",
        "fd-open",
        "fd-write",
        "fd-read",
    ] {
        assert!(
            total.ok(kind) > 0,
            "generator never made a successful {kind}\n{total}"
        );
    }
    assert!(
        total.ops["rename"].1 > 0 && total.ops["rmdir"].1 > 0,
        "{total}"
    );
    assert!(total.fd_io_unlinked > 0 && total.fd_io_moved > 0, "{total}");

    // The comparator must notice differences in contents, metadata, names and results.
    let (a, b) = (dir.path().join("cmp-a"), dir.path().join("cmp-b"));
    for root in [&a, &b] {
        fs::create_dir(root).unwrap();
        fs::write(root.join("f"), b"hello").unwrap();
        fs::create_dir(root.join("d")).unwrap();
    }
    let names = ["a", "b"];
    compare_trees(&a, &b, names, true).expect("identical trees compare equal");
    fs::write(b.join("f"), b"jello").unwrap();
    compare_trees(&a, &b, names, false).expect("metadata-only comparison ignores contents");
    assert!(compare_trees(&a, &b, names, true)
        .unwrap_err()
        .contains("contents differ"));
    fs::write(b.join("f"), b"hello").unwrap();
    fs::write(b.join("d/x"), b"").unwrap();
    assert!(compare_trees(&a, &b, names, false)
        .unwrap_err()
        .contains("d/x: only in b"));
    fs::remove_file(b.join("d/x")).unwrap();
    World::new(b.clone())
        .apply(&Op::Chmod {
            path: "f".into(),
            mode: 0o600,
        })
        .unwrap();
    assert!(compare_trees(&a, &b, names, false).is_err());
    World::new(b.clone())
        .apply(&Op::Chmod {
            path: "f".into(),
            mode: 0o644,
        })
        .unwrap();
    let mut diff = Diff::new("detector".into(), names, a, b.clone());
    diff.run(Op::Read {
        path: "f".into(),
        offset: 0,
        len: 10,
    })
    .unwrap();
    fs::write(b.join("f"), b"help").unwrap();
    let report = diff
        .run(Op::Read {
            path: "f".into(),
            offset: 0,
            len: 10,
        })
        .unwrap_err();
    assert!(report.contains("first difference at offset 3") && report.contains("   0 read f"));
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: env_number("PROPTEST_CASES").map_or(4, |n| n as u32),
        max_shrink_iters: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// The same engine with proptest choosing the per-step seeds, so that a failure shrinks
    /// to a short op sequence.
    #[test]
    fn differential_proptest(steps in prop::collection::vec(any::<u64>(), 1..80)) {
        let after: Vec<u64> = steps.iter().map(|s| s.rotate_left(17)).take(10).collect();
        let res = run_mirrorfs_case("proptest case".to_string(), &steps, &after);
        prop_assert!(res.is_ok(), "{}", res.err().unwrap_or_default());
    }
}
