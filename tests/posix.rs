//! POSIX semantics through a real mount: renames (including renameat2 flags), links,
//! special files, attributes and timestamps, appends, holes, files past 4 GiB, long and
//! non-UTF-8 names, xattrs, statfs, large directories, open-unlinked files, persistence
//! of everything across a remount, and permission checks for other users.

mod common;

use common::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

// ---------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------

fn c(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn cs(s: &str) -> CString {
    CString::new(s).unwrap()
}

/// `Ok(())` when a libc call returned 0 (or more), the errno otherwise.
fn check(rc: i64) -> Result<(), i32> {
    if rc >= 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    }
}

/// Asserts that `r` failed with errno `want`.
#[track_caller]
fn assert_errno<T: std::fmt::Debug>(r: std::io::Result<T>, want: i32, what: &str) {
    match r {
        Ok(v) => panic!("{what}: expected errno {want}, succeeded with {v:?}"),
        Err(e) => assert_eq!(e.raw_os_error(), Some(want), "{what}: got {e}"),
    }
}

#[track_caller]
fn assert_libc_errno(r: Result<(), i32>, want: i32, what: &str) {
    match r {
        Ok(()) => panic!("{what}: expected errno {want}, succeeded"),
        Err(e) => assert_eq!(
            e,
            want,
            "{what}: got {} instead of {}",
            std::io::Error::from_raw_os_error(e),
            std::io::Error::from_raw_os_error(want)
        ),
    }
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> Result<(), i32> {
    let (a, b) = (c(from), c(to));
    check(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    } as i64)
}

fn mknod(p: &Path, mode: libc::mode_t) -> Result<(), i32> {
    let cp = c(p);
    check(unsafe { libc::mknod(cp.as_ptr(), mode, 0) } as i64)
}

fn utimens(p: &Path, atime: (i64, i64), mtime: (i64, i64)) -> Result<(), i32> {
    let times = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    let cp = c(p);
    check(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            cp.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    } as i64)
}

fn setxattr(p: &Path, name: &str, value: &[u8], flags: i32) -> Result<(), i32> {
    let (cp, cn) = (c(p), cs(name));
    check(unsafe {
        libc::setxattr(
            cp.as_ptr(),
            cn.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    } as i64)
}

fn getxattr(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let (cp, cn) = (c(p), cs(name));
    let size = unsafe { libc::getxattr(cp.as_ptr(), cn.as_ptr(), std::ptr::null_mut(), 0) };
    check(size as i64)?;
    let mut buf = vec![0u8; size as usize + 16];
    let n = unsafe { libc::getxattr(cp.as_ptr(), cn.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    check(n as i64)?;
    buf.truncate(n as usize);
    Ok(buf)
}

fn listxattr(p: &Path) -> Result<Vec<String>, i32> {
    let cp = c(p);
    let size = unsafe { libc::listxattr(cp.as_ptr(), std::ptr::null_mut(), 0) };
    check(size as i64)?;
    let mut buf = vec![0u8; size as usize + 16];
    let n = unsafe { libc::listxattr(cp.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    check(n as i64)?;
    buf.truncate(n as usize);
    let mut names: Vec<String> = buf
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    names.sort();
    Ok(names)
}

fn user_xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let Ok(names) = listxattr(p) else {
        return out;
    };
    for n in names.into_iter().filter(|n| n.starts_with("user.")) {
        let v = getxattr(p, &n).unwrap_or_else(|e| panic!("getxattr {n}: errno {e}"));
        out.insert(n, v);
    }
    out
}

fn removexattr(p: &Path, name: &str) -> Result<(), i32> {
    let (cp, cn) = (c(p), cs(name));
    check(unsafe { libc::removexattr(cp.as_ptr(), cn.as_ptr()) } as i64)
}

fn meta(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
}

fn mode(p: &Path) -> u32 {
    meta(p).mode() & 0o7777
}

fn chmod(p: &Path, m: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
}

fn names_in(dir: &Path) -> Vec<OsString> {
    let mut v: Vec<OsString> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------
// rename
// ---------------------------------------------------------------------------------------

#[test]
fn rename_replaces_files_and_empty_directories() {
    let fx = Fixture::new(2);
    let m = fx.mount();
    let (a, b) = (m.path("a"), m.path("b"));
    fs::write(&a, b"contents of a").unwrap();
    fs::write(&b, b"b").unwrap();
    let ino_a = meta(&a).ino();

    // A file replaces a file; the target's old contents stay readable through an open fd.
    let held = File::open(&b).unwrap();
    fs::rename(&a, &b).unwrap();
    assert_errno(fs::metadata(&a), libc::ENOENT, "old name after rename");
    assert_eq!(fs::read(&b).unwrap(), b"contents of a");
    assert_eq!(meta(&b).ino(), ino_a, "rename keeps the inode");
    assert_eq!(meta(&b).nlink(), 1);
    let mut old = String::new();
    (&held).read_to_string(&mut old).unwrap();
    assert_eq!(old, "b", "replaced file still readable through its fd");
    drop(held);

    // Renaming a name onto itself, or onto another name of the same inode, is a no-op.
    fs::rename(&b, &b).unwrap();
    assert_eq!(fs::read(&b).unwrap(), b"contents of a");
    fs::hard_link(&b, m.path("b2")).unwrap();
    fs::rename(&b, m.path("b2")).unwrap();
    assert!(
        b.exists() && m.path("b2").exists(),
        "rename between hard links is a no-op"
    );
    fs::remove_file(m.path("b2")).unwrap();

    // A directory replaces an empty directory.
    let (d1, d2) = (m.path("d1"), m.path("d2"));
    fs::create_dir(&d1).unwrap();
    fs::create_dir(d1.join("sub")).unwrap();
    fs::write(d1.join("sub/inside"), b"inside").unwrap();
    fs::create_dir(&d2).unwrap();
    fs::rename(&d1, &d2).unwrap();
    assert!(!d1.exists());
    assert_eq!(fs::read(d2.join("sub/inside")).unwrap(), b"inside");
    assert_eq!(
        meta(&d2.join("sub/..")).ino(),
        meta(&d2).ino(),
        "'..' follows the move"
    );

    // A directory onto a non-empty directory: ENOTEMPTY, both intact.
    let d3 = m.path("d3");
    fs::create_dir(&d3).unwrap();
    fs::write(d3.join("x"), b"x").unwrap();
    assert_errno(
        fs::rename(&d3, &d2),
        libc::ENOTEMPTY,
        "dir onto non-empty dir",
    );
    assert_eq!(fs::read(d3.join("x")).unwrap(), b"x");
    assert_eq!(fs::read(d2.join("sub/inside")).unwrap(), b"inside");

    // Type mismatches and moving a directory into itself.
    assert_errno(fs::rename(&b, &d3), libc::EISDIR, "file onto dir");
    assert_errno(fs::rename(&d3, &b), libc::ENOTDIR, "dir onto file");
    assert_errno(
        fs::rename(&d2, d2.join("sub/deeper")),
        libc::EINVAL,
        "dir into itself",
    );
    assert_errno(
        fs::rename(m.path("missing"), m.path("z")),
        libc::ENOENT,
        "missing source",
    );

    // Across directories, then a directory with contents into another one.
    fs::rename(&b, d3.join("moved")).unwrap();
    assert_eq!(fs::read(d3.join("moved")).unwrap(), b"contents of a");
    fs::rename(&d3, d2.join("d3")).unwrap();
    assert_eq!(fs::read(d2.join("d3/moved")).unwrap(), b"contents of a");
    assert_eq!(names_in(&m.mnt), [OsString::from("d2")]);

    // All of it survives a remount.
    m.unmount();
    let m = fx.mount();
    assert_eq!(names_in(&m.mnt), [OsString::from("d2")]);
    assert_eq!(fs::read(m.path("d2/d3/moved")).unwrap(), b"contents of a");
    assert_eq!(fs::read(m.path("d2/sub/inside")).unwrap(), b"inside");
    assert_eq!(meta(&m.path("d2/d3/moved")).ino(), ino_a);
}

#[test]
fn renameat2_noreplace_and_exchange() {
    let fx = Fixture::new(2);
    let m = fx.mount();
    let (a, b) = (m.path("a"), m.path("b"));
    fs::write(&a, b"A").unwrap();
    fs::write(&b, b"B").unwrap();

    let r = renameat2(&a, &b, libc::RENAME_NOREPLACE);
    assert_libc_errno(r, libc::EEXIST, "RENAME_NOREPLACE onto an existing file");
    assert_eq!(fs::read(&a).unwrap(), b"A");
    assert_eq!(fs::read(&b).unwrap(), b"B");
    renameat2(&a, &m.path("c"), libc::RENAME_NOREPLACE).unwrap();
    assert!(!a.exists());
    assert_eq!(fs::read(m.path("c")).unwrap(), b"A");

    // Exchange two files.
    let (ino_b, ino_c) = (meta(&b).ino(), meta(&m.path("c")).ino());
    renameat2(&b, &m.path("c"), libc::RENAME_EXCHANGE).unwrap();
    assert_eq!(fs::read(&b).unwrap(), b"A");
    assert_eq!(fs::read(m.path("c")).unwrap(), b"B");
    assert_eq!(meta(&b).ino(), ino_c);
    assert_eq!(meta(&m.path("c")).ino(), ino_b);

    // Exchange a file and a non-empty directory, in different parent directories.
    let d = m.path("d");
    fs::create_dir(&d).unwrap();
    fs::write(d.join("child"), b"child").unwrap();
    fs::create_dir(m.path("p")).unwrap();
    let f = m.path("p/f");
    fs::write(&f, b"file").unwrap();
    renameat2(&f, &d, libc::RENAME_EXCHANGE).unwrap();
    assert!(meta(&f).is_dir(), "p/f is now the directory");
    assert_eq!(fs::read(f.join("child")).unwrap(), b"child");
    assert!(meta(&d).is_file(), "d is now the file");
    assert_eq!(fs::read(&d).unwrap(), b"file");
    assert_eq!(
        meta(&f.join("..")).ino(),
        meta(&m.path("p")).ino(),
        "'..' of moved dir"
    );

    let r = renameat2(&b, &m.path("missing"), libc::RENAME_EXCHANGE);
    assert_libc_errno(r, libc::ENOENT, "RENAME_EXCHANGE with a missing target");
    assert_eq!(fs::read(&b).unwrap(), b"A");

    m.unmount();
    let m = fx.mount();
    assert_eq!(fs::read(m.path("b")).unwrap(), b"A");
    assert_eq!(fs::read(m.path("c")).unwrap(), b"B");
    assert_eq!(fs::read(m.path("d")).unwrap(), b"file");
    assert_eq!(fs::read(m.path("p/f/child")).unwrap(), b"child");
    assert_eq!(names_in(&m.mnt), ["b", "c", "d", "p"].map(OsString::from));
}

// ---------------------------------------------------------------------------------------
// links and special files
// ---------------------------------------------------------------------------------------

#[test]
fn hard_links_share_data_and_count() {
    let fx = Fixture::new(2);
    let m = fx.mount();
    let (a, b, cc) = (m.path("a"), m.path("b"), m.path("sub/c"));
    fs::create_dir(m.path("sub")).unwrap();
    fs::write(&a, b"shared").unwrap();
    fs::hard_link(&a, &b).unwrap();
    assert_eq!(meta(&a).nlink(), 2);
    assert_eq!(meta(&b).nlink(), 2);
    assert_eq!(meta(&a).ino(), meta(&b).ino());
    fs::hard_link(&b, &cc).unwrap();
    for p in [&a, &b, &cc] {
        assert_eq!(meta(p).nlink(), 3, "{}", p.display());
    }

    // Data written through one name is seen through the others, and so are attributes.
    OpenOptions::new()
        .append(true)
        .open(&cc)
        .unwrap()
        .write_all(b" data")
        .unwrap();
    assert_eq!(fs::read(&a).unwrap(), b"shared data");
    chmod(&b, 0o600);
    assert_eq!(mode(&a), 0o600);
    assert_eq!(meta(&a).len(), 11);

    fs::remove_file(&a).unwrap();
    assert_errno(fs::metadata(&a), libc::ENOENT, "unlinked name");
    assert_eq!(meta(&b).nlink(), 2);
    assert_eq!(fs::read(&cc).unwrap(), b"shared data");

    assert_errno(
        fs::hard_link(m.path("sub"), m.path("dirlink")),
        libc::EPERM,
        "link a dir",
    );
    assert_errno(
        fs::hard_link(&b, &cc),
        libc::EEXIST,
        "link onto existing name",
    );
    assert_errno(
        fs::hard_link(&a, m.path("x")),
        libc::ENOENT,
        "link of a missing file",
    );

    m.unmount();
    let m = fx.mount();
    let (b, cc) = (m.path("b"), m.path("sub/c"));
    assert_eq!(meta(&b).nlink(), 2);
    assert_eq!(meta(&b).ino(), meta(&cc).ino());
    assert_eq!(fs::read(&b).unwrap(), b"shared data");
    fs::remove_file(&b).unwrap();
    assert_eq!(meta(&cc).nlink(), 1);
    fs::remove_file(&cc).unwrap();
    assert!(names_in(&m.path("sub")).is_empty());
}

#[test]
fn symlinks_and_readlink() {
    let fx = Fixture::new(2);
    let m = fx.mount();
    fs::write(m.path("target"), b"pointed to").unwrap();
    let l = m.path("link");
    std::os::unix::fs::symlink("target", &l).unwrap();
    let md = meta(&l);
    assert!(md.file_type().is_symlink());
    assert_eq!(md.len(), 6, "symlink size is the target length");
    assert_eq!(fs::read_link(&l).unwrap(), Path::new("target"));
    assert_eq!(fs::read(&l).unwrap(), b"pointed to");

    let dangling = m.path("dangling");
    std::os::unix::fs::symlink("/no/such/place", &dangling).unwrap();
    assert_errno(
        fs::metadata(&dangling),
        libc::ENOENT,
        "stat through a dangling link",
    );
    assert!(meta(&dangling).file_type().is_symlink());

    // A long target with arbitrary bytes (PATH_MAX - 1 = 4095 bytes).
    let long: Vec<u8> = (0..4095).map(|i| b"abc/\xff\x01 ."[i % 8]).collect();
    let long_link = m.path("long");
    std::os::unix::fs::symlink(OsStr::from_bytes(&long), &long_link).unwrap();
    assert_eq!(
        fs::read_link(&long_link).unwrap().as_os_str().as_bytes(),
        &long[..]
    );

    std::fs::create_dir(m.path("dir")).unwrap();
    std::os::unix::fs::symlink("../target", m.path("dir/up")).unwrap();
    assert_eq!(fs::read(m.path("dir/up")).unwrap(), b"pointed to");
    std::os::unix::fs::symlink("dir", m.path("dirlink")).unwrap();
    assert_eq!(fs::read(m.path("dirlink/up")).unwrap(), b"pointed to");

    assert_errno(
        std::os::unix::fs::symlink("x", &l),
        libc::EEXIST,
        "symlink onto a name",
    );
    assert_errno(
        fs::read_link(m.path("target")),
        libc::EINVAL,
        "readlink of a file",
    );
    std::os::unix::fs::lchown(&l, Some(321), Some(654)).unwrap();
    assert_eq!((meta(&l).uid(), meta(&l).gid()), (321, 654));
    assert_eq!(
        meta(&m.path("target")).uid(),
        0,
        "lchown must not follow the link"
    );

    m.unmount();
    let m = fx.mount();
    assert_eq!(fs::read_link(m.path("link")).unwrap(), Path::new("target"));
    assert_eq!(
        fs::read_link(m.path("long"))
            .unwrap()
            .as_os_str()
            .as_bytes(),
        &long[..]
    );
    assert_eq!(
        (meta(&m.path("link")).uid(), meta(&m.path("link")).gid()),
        (321, 654)
    );
    assert_eq!(fs::read(m.path("dirlink/up")).unwrap(), b"pointed to");
}

#[test]
fn mknod_fifo_socket_and_regular() {
    let fx = Fixture::new(2);
    let m = fx.mount();
    let fifo = m.path("fifo");
    mknod(&fifo, libc::S_IFIFO | 0o640).unwrap();
    assert!(meta(&fifo).file_type().is_fifo());
    assert_eq!(mode(&fifo), 0o640);
    let f2 = m.path("fifo2");
    let cf = c(&f2);
    assert_eq!(unsafe { libc::mkfifo(cf.as_ptr(), 0o600) }, 0);
    assert!(meta(&f2).file_type().is_fifo());

    // Data goes through the pipe (served by the kernel, not stored).
    let mut p = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    p.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    p.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    drop(p);
    assert_eq!(meta(&fifo).len(), 0);

    let sock = m.path("sock");
    mknod(&sock, libc::S_IFSOCK | 0o600).unwrap();
    assert!(meta(&sock).file_type().is_socket());
    let reg = m.path("reg");
    mknod(&reg, libc::S_IFREG | 0o604).unwrap();
    assert!(meta(&reg).is_file());
    assert_eq!(mode(&reg), 0o604);
    assert_eq!(meta(&reg).len(), 0);
    assert_libc_errno(
        mknod(&reg, libc::S_IFIFO | 0o600),
        libc::EEXIST,
        "mknod on a name",
    );

    m.unmount();
    let m = fx.mount();
    assert!(meta(&m.path("fifo")).file_type().is_fifo());
    assert_eq!(mode(&m.path("fifo")), 0o640);
    assert!(meta(&m.path("sock")).file_type().is_socket());
    assert!(meta(&m.path("reg")).is_file());
}

// ---------------------------------------------------------------------------------------
// attributes
// ---------------------------------------------------------------------------------------

#[test]
fn chmod_chown_truncate_and_utimens() {
    let fx = Fixture::new(2);
    let m = fx.mount();
    let f = m.path("f");
    fs::write(&f, b"0123456789").unwrap();

    for md in [0o751, 0o4755, 0o2711, 0o000, 0o644] {
        chmod(&f, md);
        assert_eq!(mode(&f), md, "chmod {md:o}");
    }
    let d = m.path("d");
    fs::create_dir(&d).unwrap();
    chmod(&d, 0o1777);
    assert_eq!(mode(&d), 0o1777);
    assert!(meta(&d).is_dir());

    std::os::unix::fs::chown(&f, Some(1234), Some(5678)).unwrap();
    assert_eq!((meta(&f).uid(), meta(&f).gid()), (1234, 5678));
    std::os::unix::fs::chown(&f, None, Some(42)).unwrap();
    assert_eq!((meta(&f).uid(), meta(&f).gid()), (1234, 42));
    std::os::unix::fs::chown(&f, Some(0), Some(0)).unwrap();

    // ctime moves on a metadata change.
    let before = (meta(&f).ctime(), meta(&f).ctime_nsec());
    std::thread::sleep(Duration::from_millis(20));
    chmod(&f, 0o640);
    let after = (meta(&f).ctime(), meta(&f).ctime_nsec());
    assert!(
        after > before,
        "ctime not updated by chmod: {before:?} -> {after:?}"
    );

    // truncate: grow with zeros, shrink, grow again (no stale bytes come back).
    let file = OpenOptions::new().read(true).write(true).open(&f).unwrap();
    file.set_len(100_000).unwrap();
    assert_eq!(meta(&f).len(), 100_000);
    let data = fs::read(&f).unwrap();
    assert_eq!(&data[..10], b"0123456789");
    assert!(data[10..].iter().all(|&b| b == 0));
    file.set_len(3).unwrap();
    assert_eq!(fs::read(&f).unwrap(), b"012");
    file.set_len(10).unwrap();
    assert_eq!(fs::read(&f).unwrap(), b"012\0\0\0\0\0\0\0");
    let cf = c(&f);
    assert_eq!(unsafe { libc::truncate(cf.as_ptr(), 0) }, 0);
    assert_eq!(meta(&f).len(), 0);
    drop(file);

    // Explicit times with nanoseconds, on a file, a directory and a symlink.
    std::os::unix::fs::symlink("f", m.path("l")).unwrap();
    let atime = (1_000_000_000, 123_456_789);
    let mtime = (1_500_000_000, 987_654_321);
    for p in [&f, &d, &m.path("l")] {
        utimens(p, atime, mtime).unwrap();
        let md = meta(p);
        assert_eq!(
            (md.atime(), md.atime_nsec()),
            atime,
            "atime of {}",
            p.display()
        );
        assert_eq!(
            (md.mtime(), md.mtime_nsec()),
            mtime,
            "mtime of {}",
            p.display()
        );
    }
    // UTIME_OMIT keeps one of them; UTIME_NOW takes the current time.
    utimens(&f, (0, libc::UTIME_OMIT), (1_600_000_000, 5)).unwrap();
    assert_eq!((meta(&f).atime(), meta(&f).atime_nsec()), atime);
    assert_eq!(
        (meta(&f).mtime(), meta(&f).mtime_nsec()),
        (1_600_000_000, 5)
    );
    utimens(&f, (0, libc::UTIME_OMIT), (0, libc::UTIME_NOW)).unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (meta(&f).mtime() - now).abs() < 60,
        "UTIME_NOW: {}",
        meta(&f).mtime()
    );

    // A write moves mtime to now.
    utimens(&f, atime, mtime).unwrap();
    fs::write(&f, b"new").unwrap();
    assert!(
        (meta(&f).mtime() - now).abs() < 60,
        "mtime after write: {}",
        meta(&f).mtime()
    );

    utimens(&f, atime, mtime).unwrap();
    m.unmount();
    let m = fx.mount();
    let md = meta(&m.path("f"));
    assert_eq!((md.atime(), md.atime_nsec()), atime);
    assert_eq!((md.mtime(), md.mtime_nsec()), mtime);
    assert_eq!(md.mode() & 0o7777, 0o640);
    assert_eq!(mode(&m.path("d")), 0o1777);
}

#[test]
fn timestamps_before_1970_and_far_future() {
    let fx = Fixture::new(2);
    let m = fx.mount();
    let f = m.path("old");
    fs::write(&f, b"x").unwrap();
    let old = (-86_400 * 365, 250_000_000);
    let future = (4_102_444_800, 999_999_999); // 2100-01-01
    utimens(&f, old, future).unwrap();
    let md = meta(&f);
    assert_eq!((md.atime(), md.atime_nsec()), old);
    assert_eq!((md.mtime(), md.mtime_nsec()), future);
    m.unmount();
    let m = fx.mount();
    let md = meta(&m.path("old"));
    assert_eq!((md.atime(), md.atime_nsec()), old);
    assert_eq!((md.mtime(), md.mtime_nsec()), future);
}

#[test]
fn o_append_writes_go_to_the_end() {
    let fx = Fixture::new(2);
    let m = fx.mount();
    let p = m.path("log");
    fs::write(&p, b"start\n").unwrap();
    let mut a = OpenOptions::new().append(true).open(&p).unwrap();
    let mut b = OpenOptions::new().append(true).open(&p).unwrap();
    a.write_all(b"one\n").unwrap();
    b.write_all(b"two\n").unwrap();
    a.write_all(b"three\n").unwrap();
    assert_eq!(a.stream_position().unwrap(), 20);
    b.sync_all().unwrap();
    a.sync_data().unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"start\none\ntwo\nthree\n");

    // A writer at an explicit offset, then an append lands after the new end.
    let w = OpenOptions::new().write(true).open(&p).unwrap();
    w.write_all_at(b"START", 0).unwrap();
    w.write_all_at(b"tail\n", 20).unwrap();
    b.write_all(b"end\n").unwrap();
    assert_eq!(
        fs::read(&p).unwrap(),
        b"START\none\ntwo\nthree\ntail\nend\n"
    );

    // Many small appends from several threads: every record lands exactly once.
    let q = m.path("parallel");
    File::create(&q).unwrap();
    std::thread::scope(|s| {
        for t in 0..4 {
            let q = &q;
            s.spawn(move || {
                let mut f = OpenOptions::new().append(true).open(q).unwrap();
                for i in 0..200 {
                    f.write_all(format!("t{t}-{i:03}\n").as_bytes()).unwrap();
                }
            });
        }
    });
    let text = fs::read_to_string(&q).unwrap();
    let lines: HashSet<&str> = text.lines().collect();
    assert_eq!(text.lines().count(), 800);
    assert_eq!(lines.len(), 800);
}

#[test]
fn sparse_files_read_zeros_in_holes() {
    let fx = Fixture::new(2);
    let m = fx.mount();
    let p = m.path("sparse");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p);
    let f = f.unwrap();
    f.write_all_at(b"A", 0).unwrap();
    f.write_all_at(b"B", 3_000_000).unwrap();
    assert_eq!(meta(&p).len(), 3_000_001);
    let data = fs::read(&p).unwrap();
    assert_eq!(data.len(), 3_000_001);
    assert_eq!(data[0], b'A');
    assert_eq!(data[3_000_000], b'B');
    assert!(
        data[1..3_000_000].iter().all(|&b| b == 0),
        "hole is not zero"
    );

    f.set_len(10_000_000).unwrap();
    let mut buf = vec![1u8; 100_000];
    f.read_exact_at(&mut buf, 9_900_000).unwrap();
    assert!(buf.iter().all(|&b| b == 0));

    // Overwritten data beyond a shrink must not reappear when the file grows again.
    let g = m.path("regrow");
    fs::write(&g, vec![0xaa; 70_000]).unwrap();
    let gf = OpenOptions::new().write(true).open(&g).unwrap();
    gf.set_len(100).unwrap();
    gf.set_len(70_000).unwrap();
    gf.write_all_at(b"Z", 80_000).unwrap();
    let data = fs::read(&g).unwrap();
    assert_eq!(data.len(), 80_001);
    assert!(data[..100].iter().all(|&b| b == 0xaa));
    assert!(
        data[100..80_000].iter().all(|&b| b == 0),
        "stale bytes after shrink+grow"
    );
    drop((f, gf));

    m.unmount();
    let m = fx.mount();
    let data = fs::read(m.path("sparse")).unwrap();
    assert_eq!(data.len(), 10_000_000);
    assert_eq!((data[0], data[3_000_000]), (b'A', b'B'));
    assert_eq!(data.iter().filter(|&&b| b != 0).count(), 2);
}

#[test]
fn file_larger_than_4_gib() {
    let fx = Fixture::new(2);
    let m = fx.mount();
    let p = m.path("huge");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p);
    let mut f = f.unwrap();
    let off = 5u64 << 30;
    f.write_all_at(b"Z", off).unwrap();
    assert_eq!(meta(&p).len(), off + 1);
    let mut one = [0u8; 1];
    f.read_exact_at(&mut one, off).unwrap();
    assert_eq!(&one, b"Z");
    // Straddling the 4 GiB boundary.
    let four = 4u64 << 30;
    f.write_all_at(b"wxyz", four - 2).unwrap();
    let mut buf = [0u8; 8];
    f.read_exact_at(&mut buf, four - 4).unwrap();
    assert_eq!(&buf, b"\0\0wxyz\0\0");
    let mut hole = vec![1u8; 65536];
    f.read_exact_at(&mut hole, four + 4096).unwrap();
    assert!(hole.iter().all(|&b| b == 0), "hole past 4 GiB");
    f.read_exact_at(&mut hole, 0).unwrap();
    assert!(hole.iter().all(|&b| b == 0), "hole at 0");
    assert_eq!(f.read_at(&mut hole, off + 1).unwrap(), 0, "read at EOF");
    assert_eq!(f.seek(SeekFrom::End(0)).unwrap(), off + 1);
    drop(f);

    m.unmount();
    for b in &fx.backends {
        let kib: u64 = sh(&format!("du -sk {} | cut -f1", q(b)))
            .trim()
            .parse()
            .unwrap();
        assert!(
            kib < 256 * 1024,
            "backend {} uses {kib} KiB for a sparse file",
            b.display()
        );
    }
    let m = fx.mount();
    let f = File::open(m.path("huge")).unwrap();
    assert_eq!(f.metadata().unwrap().len(), off + 1);
    f.read_exact_at(&mut one, off).unwrap();
    assert_eq!(&one, b"Z");
    f.read_exact_at(&mut buf, four - 4).unwrap();
    assert_eq!(&buf, b"\0\0wxyz\0\0");
}

// ---------------------------------------------------------------------------------------
// names
// ---------------------------------------------------------------------------------------

#[test]
fn names_of_255_arbitrary_bytes_and_too_long_names() {
    let fx = Fixture::new(2);
    let m = fx.mount();
    let mut name: Vec<u8> = (1..=255u8).filter(|&b| b != b'/').collect();
    name.push(b'.');
    assert_eq!(name.len(), 255);
    let mut reversed = name.clone();
    reversed.reverse();
    let n1 = OsString::from_vec(name.clone());
    let n2 = OsString::from_vec(reversed.clone());

    let p1 = m.mnt.join(&n1);
    fs::write(&p1, b"long name").unwrap();
    assert_eq!(fs::read(&p1).unwrap(), b"long name");
    let d2 = m.mnt.join(&n2);
    fs::create_dir(&d2).unwrap();
    fs::write(d2.join(&n1), b"nested").unwrap();
    assert_eq!(names_in(&m.mnt), {
        let mut v = vec![n1.clone(), n2.clone()];
        v.sort();
        v
    });
    setxattr(&p1, "user.k", b"v", 0).unwrap();

    // 256 bytes: ENAMETOOLONG for every way of making or finding a name.
    let mut long = name.clone();
    long.push(b'x');
    let too_long = m.mnt.join(OsStr::from_bytes(&long));
    assert_errno(File::create(&too_long), libc::ENAMETOOLONG, "create");
    assert_errno(fs::create_dir(&too_long), libc::ENAMETOOLONG, "mkdir");
    assert_errno(
        std::os::unix::fs::symlink("t", &too_long),
        libc::ENAMETOOLONG,
        "symlink",
    );
    assert_errno(fs::hard_link(&p1, &too_long), libc::ENAMETOOLONG, "link");
    assert_errno(fs::rename(&p1, &too_long), libc::ENAMETOOLONG, "rename");
    assert_libc_errno(
        mknod(&too_long, libc::S_IFIFO | 0o600),
        libc::ENAMETOOLONG,
        "mknod",
    );
    assert_errno(fs::metadata(&too_long), libc::ENAMETOOLONG, "lookup");
    assert_eq!(names_in(&m.mnt).len(), 2, "nothing was created");

    // A rename between two 255-byte names.
    let p3 = d2.join(&n2);
    fs::rename(&p1, &p3).unwrap();
    assert_eq!(fs::read(&p3).unwrap(), b"long name");

    m.unmount();
    let m = fx.mount();
    assert_eq!(names_in(&m.mnt), std::slice::from_ref(&n2));
    let d2 = m.mnt.join(&n2);
    let mut inner = vec![n1.clone(), n2.clone()];
    inner.sort();
    assert_eq!(names_in(&d2), inner);
    assert_eq!(fs::read(d2.join(&n2)).unwrap(), b"long name");
    assert_eq!(fs::read(d2.join(&n1)).unwrap(), b"nested");
    assert_eq!(getxattr(&d2.join(&n2), "user.k").unwrap(), b"v");
}

// ---------------------------------------------------------------------------------------
// xattrs
// ---------------------------------------------------------------------------------------

#[test]
fn extended_attributes() {
    let fx = Fixture::new(2);
    let m = fx.mount();
    let f = m.path("f");
    fs::write(&f, b"x").unwrap();
    let binary: Vec<u8> = (0..4000u32).map(|i| (i * 7 % 256) as u8).collect();

    setxattr(&f, "user.alpha", b"1", 0).unwrap();
    setxattr(&f, "user.beta", &binary, 0).unwrap();
    setxattr(&f, "user.empty", b"", 0).unwrap();
    assert_eq!(getxattr(&f, "user.alpha").unwrap(), b"1");
    assert_eq!(getxattr(&f, "user.beta").unwrap(), binary);
    assert_eq!(getxattr(&f, "user.empty").unwrap(), b"");
    let user: Vec<String> = listxattr(&f)
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with("user."))
        .collect();
    assert_eq!(user, ["user.alpha", "user.beta", "user.empty"]);

    // Size queries and buffers that are too small.
    let (cf, cn) = (c(&f), cs("user.beta"));
    let size = unsafe { libc::getxattr(cf.as_ptr(), cn.as_ptr(), std::ptr::null_mut(), 0) };
    assert_eq!(size, 4000);
    let mut small = [0u8; 10];
    let r = unsafe { libc::getxattr(cf.as_ptr(), cn.as_ptr(), small.as_mut_ptr().cast(), 10) };
    assert_libc_errno(
        check(r as i64),
        libc::ERANGE,
        "getxattr into a small buffer",
    );
    let r = unsafe { libc::listxattr(cf.as_ptr(), small.as_mut_ptr().cast(), 5) };
    assert_libc_errno(
        check(r as i64),
        libc::ERANGE,
        "listxattr into a small buffer",
    );

    // XATTR_CREATE / XATTR_REPLACE.
    let r = setxattr(&f, "user.alpha", b"2", libc::XATTR_CREATE);
    assert_libc_errno(r, libc::EEXIST, "XATTR_CREATE on an existing attribute");
    assert_eq!(getxattr(&f, "user.alpha").unwrap(), b"1");
    let r = setxattr(&f, "user.gamma", b"3", libc::XATTR_REPLACE);
    assert_libc_errno(r, libc::ENODATA, "XATTR_REPLACE on a missing attribute");
    assert_libc_errno(
        getxattr(&f, "user.gamma").map(|_| ()),
        libc::ENODATA,
        "not created",
    );
    setxattr(&f, "user.alpha", b"replaced", libc::XATTR_REPLACE).unwrap();
    assert_eq!(getxattr(&f, "user.alpha").unwrap(), b"replaced");
    setxattr(&f, "user.gamma", b"3", libc::XATTR_CREATE).unwrap();

    // Remove.
    removexattr(&f, "user.gamma").unwrap();
    assert_libc_errno(
        getxattr(&f, "user.gamma").map(|_| ()),
        libc::ENODATA,
        "removed",
    );
    assert_libc_errno(removexattr(&f, "user.gamma"), libc::ENODATA, "remove twice");
    assert_libc_errno(
        getxattr(&f, "user.none").map(|_| ()),
        libc::ENODATA,
        "missing",
    );

    // Through a file descriptor, and on a directory.
    let file = File::open(&f).unwrap();
    let mut buf = [0u8; 64];
    let n = unsafe {
        libc::fgetxattr(
            file.as_raw_fd(),
            cs("user.alpha").as_ptr(),
            buf.as_mut_ptr().cast(),
            64,
        )
    };
    assert_eq!(&buf[..n as usize], b"replaced");
    drop(file);
    let d = m.path("d");
    fs::create_dir(&d).unwrap();
    setxattr(&d, "user.dir", b"on a directory", 0).unwrap();
    assert_eq!(getxattr(&d, "user.dir").unwrap(), b"on a directory");

    // Attributes belong to the inode: visible through a hard link.
    fs::hard_link(&f, m.path("f2")).unwrap();
    assert_eq!(getxattr(&m.path("f2"), "user.alpha").unwrap(), b"replaced");

    let want = user_xattrs(&f);
    assert_eq!(want.len(), 3);
    m.unmount();
    let m = fx.mount();
    assert_eq!(user_xattrs(&m.path("f")), want);
    assert_eq!(
        getxattr(&m.path("d"), "user.dir").unwrap(),
        b"on a directory"
    );
}

// ---------------------------------------------------------------------------------------
// statfs, readdir, unlinked files, common errors
// ---------------------------------------------------------------------------------------

#[test]
fn statfs_reports_sane_values() {
    let fx = Fixture::new(2);
    let m = fx.mount();
    fs::write(m.path("f"), vec![7u8; 100_000]).unwrap();
    for p in [m.mnt.clone(), m.path("f")] {
        let cp = c(&p);
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(cp.as_ptr(), &mut st) }, 0, "statvfs");
        assert!(st.f_bsize > 0 && st.f_frsize > 0, "block sizes");
        assert!(st.f_blocks > 0, "f_blocks");
        assert!(
            st.f_bfree <= st.f_blocks && st.f_bavail <= st.f_blocks,
            "free <= total"
        );
        assert_eq!(st.f_namemax, 255, "name length limit");
        // The capacity is not made up: no more than the backend filesystem has.
        let bp = c(&fx.backends[0]);
        let mut bst: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(bp.as_ptr(), &mut bst) }, 0);
        let total = st.f_blocks as u128 * st.f_frsize as u128;
        let backend_total = bst.f_blocks as u128 * bst.f_frsize as u128;
        assert!(
            total <= backend_total,
            "mount claims {total} bytes, backend has {backend_total}"
        );
    }
    let f = File::open(&m.mnt).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(
        unsafe { libc::fstatvfs(f.as_raw_fd(), &mut st) },
        0,
        "fstatvfs"
    );
}

fn entry_name(i: usize) -> String {
    format!("entry-{i:04}-{}", "n".repeat(i % 60))
}

/// All entries of `dir` through opendir/readdir, including "." and "..".
fn raw_readdir(dir: &Path) -> Vec<Vec<u8>> {
    let cd = c(dir);
    let d = unsafe { libc::opendir(cd.as_ptr()) };
    assert!(!d.is_null(), "opendir {}", dir.display());
    let mut out = Vec::new();
    loop {
        let e = unsafe { libc::readdir64(d) };
        if e.is_null() {
            break;
        }
        out.push(
            unsafe { CStr::from_ptr((*e).d_name.as_ptr()) }
                .to_bytes()
                .to_vec(),
        );
    }
    unsafe { libc::closedir(d) };
    out
}

#[test]
fn readdir_of_2000_entries_returns_each_once() {
    let fx = Fixture::new(2);
    let m = fx.mount();
    let dir = m.path("big");
    fs::create_dir(&dir).unwrap();
    for i in 0..2000 {
        File::create(dir.join(entry_name(i))).unwrap();
    }
    let mut want: Vec<Vec<u8>> = (0..2000).map(|i| entry_name(i).into_bytes()).collect();
    want.push(b".".to_vec());
    want.push(b"..".to_vec());
    want.sort();
    let mut got = raw_readdir(&dir);
    got.sort();
    assert_eq!(got.len(), 2002, "entry count (with . and ..)");
    assert_eq!(got, want);
    assert_eq!(fs::read_dir(&dir).unwrap().count(), 2000);

    m.unmount();
    let m = fx.mount();
    let mut got = raw_readdir(&m.path("big"));
    got.sort();
    assert_eq!(got, want, "after remount");
}

/// Entries neither removed nor added while a directory is being read are returned exactly
/// once (what `rm -rf` and `find -delete` rely on).
#[test]
fn readdir_is_stable_while_entries_change() {
    let fx = Fixture::new(2);
    let m = fx.mount();
    let dir = m.path("d");
    fs::create_dir(&dir).unwrap();
    for i in 0..1000 {
        File::create(dir.join(entry_name(i))).unwrap();
    }
    let cd = c(&dir);
    let d = unsafe { libc::opendir(cd.as_ptr()) };
    assert!(!d.is_null());
    let mut seen: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut changed = false;
    loop {
        let e = unsafe { libc::readdir64(d) };
        if e.is_null() {
            break;
        }
        let name = unsafe { CStr::from_ptr((*e).d_name.as_ptr()) }
            .to_bytes()
            .to_vec();
        *seen.entry(name).or_default() += 1;
        if seen.len() == 400 && !changed {
            changed = true;
            // Remove every third entry (seen or not) and add new ones.
            for i in (0..1000).step_by(3) {
                fs::remove_file(dir.join(entry_name(i))).unwrap();
            }
            for i in 0..300 {
                File::create(dir.join(format!("new-{i}"))).unwrap();
            }
        }
    }
    unsafe { libc::closedir(d) };
    assert!(changed);
    let dups: Vec<_> = seen
        .iter()
        .filter(|(_, &n)| n > 1)
        .map(|(k, _)| k)
        .collect();
    assert!(dups.is_empty(), "entries returned twice: {:?}", dups.len());
    let missing: Vec<usize> = (0..1000)
        .filter(|i| i % 3 != 0)
        .filter(|&i| !seen.contains_key(entry_name(i).as_bytes()))
        .collect();
    assert!(
        missing.is_empty(),
        "unchanged entries not returned: {missing:?}"
    );
    let now = fs::read_dir(&dir).unwrap().count();
    assert_eq!(now, 1000 - 334 + 300);
}

#[test]
fn unlinked_open_file_stays_usable() {
    let fx = Fixture::new(2);
    let m = fx.mount();
    let p = m.path("tmp");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p);
    let mut f = f.unwrap();
    f.write_all(b"hello").unwrap();
    fs::remove_file(&p).unwrap();
    assert_errno(fs::metadata(&p), libc::ENOENT, "stat after unlink");
    assert!(names_in(&m.mnt).is_empty());
    let mut buf = [0u8; 5];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"hello");
    f.write_all_at(b" world", 5).unwrap();
    let mut all = String::new();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.read_to_string(&mut all).unwrap();
    assert_eq!(all, "hello world");
    let md = f.metadata().unwrap();
    assert_eq!((md.nlink(), md.len()), (0, 11));
    f.set_len(4).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 4);

    // A name reused while the old file is open is a different file.
    fs::write(&p, b"new file").unwrap();
    f.read_exact_at(&mut buf[..4], 0).unwrap();
    assert_eq!(&buf[..4], b"hell");
    assert_eq!(fs::read(&p).unwrap(), b"new file");

    // Renaming over an open file: the fd keeps the old contents.
    let g = File::open(&p).unwrap();
    fs::write(m.path("other"), b"other").unwrap();
    fs::rename(m.path("other"), &p).unwrap();
    let mut old = [0u8; 8];
    g.read_exact_at(&mut old, 0).unwrap();
    assert_eq!(&old, b"new file");
    drop((f, g));

    m.unmount();
    let m = fx.mount();
    assert_eq!(names_in(&m.mnt), [OsString::from("tmp")]);
    assert_eq!(fs::read(m.path("tmp")).unwrap(), b"other");
}

#[test]
fn common_error_codes() {
    let fx = Fixture::new(2);
    let m = fx.mount();
    let (f, d) = (m.path("f"), m.path("d"));
    fs::write(&f, b"f").unwrap();
    fs::create_dir(&d).unwrap();
    fs::write(d.join("x"), b"x").unwrap();
    assert_errno(File::open(m.path("missing")), libc::ENOENT, "open missing");
    assert_errno(
        OpenOptions::new().write(true).create_new(true).open(&f),
        libc::EEXIST,
        "O_EXCL on existing",
    );
    assert_errno(fs::create_dir(&d), libc::EEXIST, "mkdir existing");
    assert_errno(fs::create_dir(&f), libc::EEXIST, "mkdir on a file name");
    assert_errno(fs::remove_dir(&d), libc::ENOTEMPTY, "rmdir non-empty");
    assert_errno(fs::remove_dir(&f), libc::ENOTDIR, "rmdir a file");
    assert_errno(fs::remove_file(&d), libc::EISDIR, "unlink a directory");
    assert_errno(
        OpenOptions::new().write(true).open(&d),
        libc::EISDIR,
        "open dir for write",
    );
    assert_errno(
        fs::metadata(f.join("x")),
        libc::ENOTDIR,
        "file as a directory",
    );
    assert_errno(
        fs::create_dir(m.path("no/such")),
        libc::ENOENT,
        "mkdir missing parent",
    );
    assert_errno(
        fs::remove_file(m.path("missing")),
        libc::ENOENT,
        "unlink missing",
    );
    fs::remove_file(d.join("x")).unwrap();
    fs::remove_dir(&d).unwrap();
    assert_eq!(names_in(&m.mnt), [OsString::from("f")]);
}

// ---------------------------------------------------------------------------------------
// persistence
// ---------------------------------------------------------------------------------------

/// Everything `stat` says about an entry that a remount must keep (inode numbers and
/// ctime may legitimately change), plus symlink target and user xattrs.
#[derive(Debug, PartialEq, Eq)]
struct Attrs {
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u64,
    size: u64,
    atime: (i64, i64),
    mtime: (i64, i64),
    link: Option<PathBuf>,
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn attrs(p: &Path) -> Attrs {
    let md = meta(p);
    let is_dir = md.is_dir();
    Attrs {
        mode: md.mode(),
        uid: md.uid(),
        gid: md.gid(),
        // Directory link counts are filesystem-specific; files' are not.
        nlink: if is_dir { 0 } else { md.nlink() },
        size: if is_dir { 0 } else { md.len() },
        atime: (md.atime(), md.atime_nsec()),
        mtime: (md.mtime(), md.mtime_nsec()),
        link: fs::read_link(p).ok(),
        xattrs: if md.file_type().is_symlink() {
            BTreeMap::new()
        } else {
            user_xattrs(p)
        },
    }
}

const ENTRIES: [&str; 9] = [
    "d", "d/f", "d/f2", "g", "d/l", "p", "d/sub", "sparse", "empty",
];

/// Stats every entry without reading anything (reads may update access times).
fn record(root: &Path) -> Vec<(String, Attrs)> {
    ENTRIES
        .iter()
        .map(|e| (e.to_string(), attrs(&root.join(e))))
        .collect()
}

#[track_caller]
fn assert_same_attrs(want: &[(String, Attrs)], got: &[(String, Attrs)], when: &str) {
    for ((name, w), (_, g)) in want.iter().zip(got) {
        assert_eq!(w, g, "{name} {when}");
    }
}

#[track_caller]
fn assert_contents(root: &Path, when: &str) {
    assert_eq!(
        fs::read(root.join("d/f")).unwrap(),
        b"file with attributes",
        "{when}"
    );
    assert_eq!(
        fs::read(root.join("g")).unwrap(),
        vec![9u8; 300_000],
        "{when}"
    );
    let sparse = fs::read(root.join("sparse")).unwrap();
    assert_eq!(sparse.len(), 7_000_003, "{when}");
    assert_eq!(&sparse[7_000_000..], b"end", "{when}");
    assert!(sparse[..7_000_000].iter().all(|&b| b == 0), "{when}");
    assert_eq!(fs::read(root.join("empty")).unwrap(), b"", "{when}");
}

#[test]
fn attributes_persist_across_remount_and_on_each_backend() {
    let fx = Fixture::new(3);
    let m = fx.mount();
    let r = |p: &str| m.path(p);
    fs::create_dir(r("d")).unwrap();
    fs::create_dir(r("d/sub")).unwrap();
    fs::write(r("d/f"), b"file with attributes").unwrap();
    fs::hard_link(r("d/f"), r("d/f2")).unwrap();
    fs::write(r("g"), vec![9u8; 300_000]).unwrap();
    std::os::unix::fs::symlink("f", r("d/l")).unwrap();
    mknod(&r("p"), libc::S_IFIFO | 0o600).unwrap();
    File::create(r("empty")).unwrap();
    let sp = File::create(r("sparse")).unwrap();
    sp.write_all_at(b"end", 7_000_000).unwrap();
    drop(sp);

    // chown before chmod: a chown clears the set-user-ID bit of a file.
    std::os::unix::fs::chown(r("d/f"), Some(1001), Some(1002)).unwrap();
    std::os::unix::fs::chown(r("d"), Some(7), Some(8)).unwrap();
    std::os::unix::fs::lchown(r("d/l"), Some(5), Some(6)).unwrap();
    std::os::unix::fs::chown(r("p"), Some(65534), Some(65534)).unwrap();
    chmod(&r("d/f"), 0o4750);
    chmod(&r("d"), 0o2750);
    chmod(&r("g"), 0o604);
    setxattr(&r("d/f"), "user.one", b"1", 0).unwrap();
    setxattr(&r("d/f"), "user.two", &[0, 255, 0], 0).unwrap();
    setxattr(&r("d"), "user.dir", b"dir", 0).unwrap();
    for (i, e) in ENTRIES.iter().rev().enumerate() {
        let t = 1_100_000_000 + i as i64 * 86_400;
        utimens(
            &r(e),
            (t, 111_111_111 * (i as i64 % 9)),
            (t + 1, 7 + i as i64),
        )
        .unwrap();
    }
    let before = record(&m.mnt);
    assert_eq!(before[1].1.nlink, 2);
    assert_eq!(before[1].1.mode & 0o7777, 0o4750);
    assert_eq!((before[1].1.uid, before[1].1.gid), (1001, 1002));
    m.unmount();

    let m = fx.mount();
    assert_same_attrs(&before, &record(&m.mnt), "after remount");
    assert!(meta(&m.path("p")).file_type().is_fifo());
    assert_contents(&m.mnt, "after remount");
    // The reference for the read-only mounts: reading may have updated access times.
    let reference = record(&m.mnt);
    m.unmount();

    for b in &fx.backends {
        let m = fx.mount_with(std::slice::from_ref(b), &["-o", "ro"]);
        let when = format!("on {} alone", b.display());
        assert_same_attrs(&reference, &record(&m.mnt), &when);
        assert_contents(&m.mnt, &when);
        m.unmount();
    }
}

// ---------------------------------------------------------------------------------------
// permissions for other users
// ---------------------------------------------------------------------------------------

/// Runs a shell command as uid/gid 65534 (nobody) with no supplementary groups.
fn as_nobody(cmd: &str) -> Output {
    let mut c = if Path::new("/usr/bin/setpriv").exists() || Path::new("/bin/setpriv").exists() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            "sh",
            "-c",
            cmd,
        ]);
        c
    } else {
        let mut c = Command::new("su");
        c.args(["nobody", "-s", "/bin/sh", "-c", cmd]);
        c
    };
    c.env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .expect("run as nobody")
}

#[track_caller]
fn nobody_ok(cmd: &str) -> String {
    let out = as_nobody(cmd);
    assert!(
        out.status.success(),
        "as nobody: {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[track_caller]
fn nobody_denied(cmd: &str, message: &str) {
    let out = as_nobody(cmd);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "as nobody, should fail: {cmd}");
    assert!(
        err.contains(message),
        "as nobody: {cmd}: expected {message:?}, got {err}"
    );
}

#[test]
fn permissions_are_enforced_for_other_users() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root to act as another user");
        return;
    }
    let fx = Fixture::new(2);
    chmod(fx.dir.path(), 0o755);
    let m = fx.mount_with(&fx.backends, &["-o", "allow_other"]);
    chmod(&m.mnt, 0o755);
    let r = |p: &str| m.path(p);
    fs::write(r("secret"), b"top secret\n").unwrap();
    chmod(&r("secret"), 0o600);
    fs::write(r("public"), b"hello\n").unwrap();
    chmod(&r("public"), 0o644);
    fs::create_dir(r("rootdir")).unwrap();
    chmod(&r("rootdir"), 0o755);
    fs::create_dir(r("private")).unwrap();
    fs::write(r("private/inner"), b"inner\n").unwrap();
    chmod(&r("private"), 0o700);
    fs::create_dir(r("open")).unwrap();
    chmod(&r("open"), 0o777);
    fs::create_dir(r("sticky")).unwrap();
    chmod(&r("sticky"), 0o1777);
    fs::write(r("sticky/roots"), b"root's\n").unwrap();
    chmod(&r("sticky/roots"), 0o666);

    let denied = "Permission denied";
    let eperm = "Operation not permitted";
    assert_eq!(nobody_ok(&format!("cat {}", q(&r("public")))), "hello\n");
    nobody_denied(&format!("cat {}", q(&r("secret"))), denied);
    nobody_denied(&format!("echo x >> {}", q(&r("public"))), denied);
    nobody_denied(&format!("touch {}", q(&r("rootdir/new"))), denied);
    nobody_denied(&format!("ls {}", q(&r("private"))), denied);
    nobody_denied(&format!("cat {}", q(&r("private/inner"))), denied);
    nobody_denied(&format!("chmod 777 {}", q(&r("public"))), eperm);
    nobody_denied(&format!("rm -f {}", q(&r("sticky/roots"))), eperm);
    nobody_denied(
        &format!("mv {} {}", q(&r("public")), q(&r("open/p"))),
        denied,
    );
    assert_eq!(fs::read(r("public")).unwrap(), b"hello\n");
    assert!(!r("rootdir/new").exists());

    // What nobody creates belongs to nobody, and the owner may change its mode.
    nobody_ok(&format!(
        "echo mine > {0}/mine && chmod 600 {0}/mine && cat {0}/mine",
        q(&r("open"))
    ));
    let md = meta(&r("open/mine"));
    assert_eq!((md.uid(), md.gid()), (65534, 65534));
    assert_eq!(md.mode() & 0o7777, 0o600);
    nobody_ok(&format!("mkdir {0}/d && touch {0}/d/x", q(&r("open"))));
    assert_eq!(meta(&r("open/d/x")).uid(), 65534);
    // Root can still read it; nobody can write into sticky/ but not remove root's file.
    assert_eq!(fs::read(r("open/mine")).unwrap(), b"mine\n");
    nobody_ok(&format!("echo hi >> {}", q(&r("sticky/roots"))));
    assert_eq!(fs::read(r("sticky/roots")).unwrap(), b"root's\nhi\n");
    m.unmount();
}
