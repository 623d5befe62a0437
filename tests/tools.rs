//! Real tools on real mounts: `cp -a`, `tar`, `rsync`, `git` and `sha256sum` through a
//! mirrorfs mount of several backends, then the same tree after a remount and through each
//! backend alone, mounted read-only (which must leave the backend untouched). Also the
//! background (daemonizing) form of `mirrorfs mount`.

mod common;

use common::*;
use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

fn have(cmd: &str) -> bool {
    Command::new("bash")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Small deterministic generator so that every run builds the same tree.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// Sets atime and mtime of `p` (not following symlinks) to `secs.nsec`.
fn set_times(p: &Path, secs: i64, nsec: i64) {
    let ts = libc::timespec {
        tv_sec: secs,
        tv_nsec: nsec,
    };
    let times = [ts, ts];
    let c = cpath(p);
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(
        rc,
        0,
        "utimensat {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

fn set_user_xattr(p: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    let c = cpath(p);
    let n = CString::new(name).unwrap();
    let rc = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `user.*` extended attributes of `p` (not following symlinks), sorted, as text.
fn user_xattrs(p: &Path) -> String {
    let c = cpath(p);
    let mut names = vec![0u8; 65536];
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
            return String::new();
        }
        return format!("listxattr error {err}");
    }
    names.truncate(n as usize);
    let mut out: Vec<String> = Vec::new();
    for name in names.split(|&b| b == 0).filter(|s| s.starts_with(b"user.")) {
        let cn = CString::new(name).unwrap();
        let mut val = vec![0u8; 65536];
        let len =
            unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), val.as_mut_ptr().cast(), val.len()) };
        let shown = if len < 0 {
            format!("error {}", std::io::Error::last_os_error())
        } else {
            val.truncate(len as usize);
            val.iter().map(|b| format!("{b:02x}")).collect()
        };
        out.push(format!("{}={}", String::from_utf8_lossy(name), shown));
    }
    out.sort();
    out.join(",")
}

/// Every entry under `root` (sorted) with its user xattrs.
fn xattr_manifest(root: &Path) -> String {
    let list = sh(&format!(
        "cd {} && find . -mindepth 1 -print0 | sort -z",
        q(root)
    ));
    let mut out = String::new();
    for rel in list.split('\0').filter(|s| !s.is_empty()) {
        let x = user_xattrs(&root.join(rel));
        if !x.is_empty() {
            out.push_str(&format!("{rel} {x}\n"));
        }
    }
    out
}

/// What a faithful copy of `root` must preserve, independent of the filesystem it is on:
/// type, mode, owner, size and link count of files, symlink targets, contents, xattrs.
/// (Directory sizes and link counts are filesystem-specific and left out.)
fn portable_manifest(root: &Path) -> String {
    let listing = sh(&format!(
        "cd {} && find . -mindepth 1 \\( -type d -printf '%P %y %m %U %G\\n' \\) -o \
         \\( -type f -printf '%P %y %m %s %n %U %G\\n' \\) -o -printf '%P %y %U %G -> %l\\n' \
         | sort && find . -type f -print0 | sort -z | xargs -0 -r sha256sum",
        q(root)
    ));
    format!("{listing}--- xattrs\n{}", xattr_manifest(root))
}

/// Modification times (with nanoseconds) of files, directories and symlinks under `root`.
fn mtime_manifest(root: &Path) -> String {
    sh(&format!(
        "cd {} && find . -mindepth 1 -printf '%P %y %T@\\n' | sort",
        q(root)
    ))
}

/// Everything that must survive a remount or a single-backend read-only mount.
fn full_manifest(root: &Path) -> String {
    format!(
        "{}--- mtimes\n{}--- xattrs\n{}",
        tree_manifest(root),
        mtime_manifest(root),
        xattr_manifest(root)
    )
}

/// Every entry of a backend directory with its mode, size, mtime and content hash.
/// Directory mtimes are left out: the test asks that no *file* of the backend changes and
/// no entry appears or disappears.
fn backend_snapshot(b: &Path) -> String {
    sh(&format!(
        "cd {} && find . -mindepth 1 \\( -type d -printf '%P %y %m %U %G\\n' \\) -o \
         -printf '%P %y %m %s %n %U %G %T@ %l\\n' | sort && \
         find . -type f -print0 | sort -z | xargs -0 -r sha256sum",
        q(b)
    ))
}

// ---------------------------------------------------------------------------------------
// the source tree
// ---------------------------------------------------------------------------------------

const FILES: usize = 300;

/// Builds a tree of `FILES` regular files with assorted names, sizes, modes and owners in
/// nested directories, plus symlinks (relative, absolute, dangling, to directories, to
/// symlinks), hard links (also across directories), an empty file, empty directories, a
/// 5 MiB file, a sparse file, restrictive directory modes, xattrs (when `xattrs`) and
/// explicit nanosecond timestamps on every entry.
fn make_tree(root: &Path, xattrs: bool) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    std::fs::create_dir(root).unwrap();
    let mut dirs: Vec<PathBuf> = vec![root.to_path_buf()];
    for i in 0..5 {
        let d = root.join(format!("dir {i}"));
        std::fs::create_dir(&d).unwrap();
        dirs.push(d.clone());
        for j in 0..3 {
            let s = d.join(format!("sub-{j}"));
            std::fs::create_dir(&s).unwrap();
            dirs.push(s);
        }
    }
    let deep = root.join("a/b/c/d/e/f/g/h/i/j");
    std::fs::create_dir_all(&deep).unwrap();
    dirs.push(deep);
    let uni = root.join("ünïcødé ✓ 目录");
    std::fs::create_dir(&uni).unwrap();
    dirs.push(uni);

    let modes = [0o644, 0o600, 0o755, 0o444, 0o640, 0o700, 0o664, 0o750];
    let mut files = Vec::new();
    for k in 0..FILES {
        let dir = &dirs[k % dirs.len()];
        let name = match k % 5 {
            0 => format!("file{k:03}.txt"),
            1 => format!("data {k}.bin"),
            2 => format!(".hidden-{k}"),
            3 => format!("ñame-{k}-€"),
            _ => format!("{k}{}", "x".repeat(100 + k % 100)),
        };
        let size = match k % 10 {
            0 => 0,
            1..=6 => rng.below(4096),
            7 | 8 => rng.below(70_000),
            _ => 131_072 + rng.below(200_000),
        } as usize;
        let p = dir.join(name);
        std::fs::write(&p, rng.bytes(size)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(modes[k % modes.len()]))
            .unwrap();
        if is_root() && k % 7 == 0 {
            std::os::unix::fs::chown(&p, Some(1000 + k as u32), Some(100)).unwrap();
        }
        files.push(p);
    }

    std::fs::write(root.join("empty"), b"").unwrap();
    std::fs::create_dir(root.join("empty-dir")).unwrap();
    std::fs::create_dir(root.join("dir 0/sub-0/empty-sub")).unwrap();

    // 5 MiB of random data.
    std::fs::write(root.join("big.bin"), rng.bytes(5 << 20)).unwrap();

    // A 16 MiB file that is mostly holes.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(root.join("sparse.img")).unwrap();
        f.set_len(16 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(&rng.bytes(10_000), 9 << 20).unwrap();
        f.write_all_at(b"tail", (16 << 20) - 4).unwrap();
    }

    // Symlinks.
    let sym = |target: &str, link: &str| {
        std::os::unix::fs::symlink(target, root.join(link)).unwrap();
    };
    sym("dir 0/file000.txt", "link-rel");
    sym("../big.bin", "dir 1/link-up");
    sym("dir 2", "link-dir");
    sym("/nonexistent/path/target", "dangling-abs");
    sym("link-rel", "link-to-link");
    sym(&"long/".repeat(60), "link-long-target");
    if is_root() {
        std::os::unix::fs::lchown(root.join("link-rel"), Some(4321), Some(4321)).unwrap();
    }

    // Hard links: pairs in one directory, one file with three names across directories.
    std::fs::create_dir(root.join("hl")).unwrap();
    for h in 0..10 {
        let orig = root.join(format!("hl/orig{h}"));
        std::fs::write(&orig, format!("hard link {h}\n").repeat(h * 50 + 1)).unwrap();
        std::fs::hard_link(&orig, root.join(format!("hl/copy{h}"))).unwrap();
    }
    std::fs::hard_link(&files[3], root.join("dir 4/third-name")).unwrap();
    std::fs::hard_link(&files[3], root.join("hl/fourth name")).unwrap();

    // Directories with restrictive modes (files created before the chmod).
    std::fs::create_dir(root.join("private")).unwrap();
    std::fs::write(root.join("private/secret"), b"s3cr3t\n").unwrap();
    std::fs::create_dir(root.join("readonly-dir")).unwrap();
    std::fs::write(root.join("readonly-dir/inside"), b"inside\n").unwrap();
    std::fs::set_permissions(root.join("private"), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(
        root.join("readonly-dir"),
        std::fs::Permissions::from_mode(0o555),
    )
    .unwrap();
    std::fs::set_permissions(root.join("dir 3"), std::fs::Permissions::from_mode(0o2775)).unwrap();

    if xattrs {
        for (i, f) in files.iter().enumerate().step_by(17) {
            set_user_xattr(f, "user.comment", format!("file number {i}").as_bytes()).unwrap();
            set_user_xattr(f, "user.bin", &[0, 1, 2, 255, 0]).unwrap();
        }
        set_user_xattr(&root.join("dir 2"), "user.dir", b"a directory").unwrap();
        set_user_xattr(&root.join("big.bin"), "user.empty", b"").unwrap();
    }

    // Explicit timestamps with nanoseconds, children before parents so that nothing
    // touches a directory after its times are set.
    let list = sh(&format!("cd {} && find . -depth -print0", q(root)));
    for (i, rel) in list.split('\0').filter(|s| !s.is_empty()).enumerate() {
        let secs = 1_300_000_000 + (i as i64) * 3_601;
        let nsec = (i as i64 * 7_919_113) % 1_000_000_000;
        set_times(&root.join(rel), secs, nsec);
    }
}

fn xattrs_supported(dir: &Path) -> bool {
    let probe = dir.join("xattr-probe");
    std::fs::write(&probe, b"").unwrap();
    let ok = set_user_xattr(&probe, "user.probe", b"1").is_ok();
    std::fs::remove_file(&probe).unwrap();
    ok
}

/// Runs `git ARGS` in `dir` with a fixed identity and no user or system configuration.
fn git(dir: &Path, args: &str) -> String {
    sh(&format!(
        "cd {} && export GIT_CONFIG_NOSYSTEM=1 GIT_CONFIG_GLOBAL=/dev/null HOME=/nonexistent \
         GIT_AUTHOR_NAME=tester GIT_AUTHOR_EMAIL=t@example.org \
         GIT_COMMITTER_NAME=tester GIT_COMMITTER_EMAIL=t@example.org && \
         git -c init.defaultBranch=main -c core.fsync=all {args}",
        q(dir)
    ))
}

// ---------------------------------------------------------------------------------------
// tests
// ---------------------------------------------------------------------------------------

/// The whole tour: copy a tree in with cp, tar and rsync, build a git repository, verify
/// every byte with sha256sum, then check the same tree after a remount and through each
/// backend alone, read-only, without changing the backend.
#[test]
fn tools_round_trip_then_remount_then_each_backend_read_only() {
    let fx = Fixture::new(3);
    let src = fx.path("src");
    let xattrs = xattrs_supported(fx.dir.path());
    make_tree(&src, xattrs);
    let want = portable_manifest(&src);
    let want_times = mtime_manifest(&src);
    assert!(
        want.lines().count() > FILES,
        "source tree too small:\n{want}"
    );

    let m = fx.mount();

    // cp -a
    let cp = m.path("cp");
    sh(&format!("cp -a {} {}", q(&src), q(&cp)));
    assert_same("cp -a", &want, &portable_manifest(&cp));
    assert_same("cp -a mtimes", &want_times, &mtime_manifest(&cp));

    // sha256sum -c of every file against sums computed on the source
    let sums = fx.path("sums");
    sh(&format!(
        "cd {} && find . -type f -print0 | sort -z | xargs -0 sha256sum > {}",
        q(&src),
        q(&sums)
    ));
    sh(&format!(
        "cd {} && sha256sum --quiet --strict -c {}",
        q(&cp),
        q(&sums)
    ));

    // The same tar archive, byte for byte, from the source and from the mount.
    let tar_src = fx.path("src.tar");
    let tar_mnt = fx.path("mnt.tar");
    sh(&format!(
        "tar --sort=name --format=gnu -C {} -cf {} .",
        q(&src),
        q(&tar_src)
    ));
    sh(&format!(
        "tar --sort=name --format=gnu -C {} -cf {} .",
        q(&cp),
        q(&tar_mnt)
    ));
    sh(&format!("cmp {} {}", q(&tar_src), q(&tar_mnt)));

    // tar: create from the mount into the mount, extract into the mount.
    let archive = m.path("tree.tar");
    let untar = m.path("untar");
    sh(&format!(
        "tar --format=posix --xattrs -C {} -cf {} .",
        q(&cp),
        q(&archive)
    ));
    std::fs::create_dir(&untar).unwrap();
    sh(&format!(
        "tar --xattrs --xattrs-include='user.*' -C {} -xpf {}",
        q(&untar),
        q(&archive)
    ));
    assert_same("tar round trip", &want, &portable_manifest(&untar));
    assert_same(
        "tar round trip mtimes",
        &want_times,
        &mtime_manifest(&untar),
    );
    sh(&format!(
        "tar -C {} --compare -f {}",
        q(&untar),
        q(&archive)
    ));

    // rsync -aH(X), then a checksum dry run must find nothing to do.
    let rs = m.path("rsync");
    let flags = if xattrs && have("setfattr") {
        "-aHX"
    } else {
        "-aH"
    };
    sh(&format!("rsync {flags} {}/ {}/", q(&src), q(&rs)));
    assert_same("rsync", &want, &portable_manifest(&rs));
    assert_same("rsync mtimes", &want_times, &mtime_manifest(&rs));
    let todo = sh(&format!("rsync {flags}c -n -i {}/ {}/", q(&src), q(&rs)));
    assert_eq!(todo.trim(), "", "rsync finds differences after a copy");

    // git: init, two commits, log, fsck, gc, clone out of the mount.
    let repo = m.path("repo");
    std::fs::create_dir(&repo).unwrap();
    git(&repo, "init -q");
    sh(&format!("cp -r {} {}/", q(&src.join("dir 1")), q(&repo)));
    sh(&format!("cp {} {}/", q(&src.join("big.bin")), q(&repo)));
    git(&repo, "add -A");
    git(&repo, "commit -qm first");
    std::fs::write(repo.join("dir 1/new file"), b"second commit\n").unwrap();
    sh(&format!("echo appended >> {}", q(&repo.join("big.bin"))));
    git(&repo, "add -A");
    git(&repo, "commit -qm second");
    let log = git(&repo, "log --format=%s");
    assert_eq!(log.lines().collect::<Vec<_>>(), ["second", "first"]);
    git(&repo, "fsck --full --strict --no-progress");
    git(&repo, "gc --quiet --prune=now");
    git(&repo, "fsck --full --strict --no-progress");
    assert_eq!(
        git(&repo, "status --porcelain"),
        "",
        "clean work tree expected"
    );
    let clone = fx.path("clone");
    sh(&format!("git clone -q {} {}", q(&repo), q(&clone)));
    sh(&format!(
        "diff -r --no-dereference --exclude=.git {} {}",
        q(&clone),
        q(&repo)
    ));

    // rsync again after changing the source: updates, deletions, new files, chmod.
    sh(&format!(
        "cd {} && echo more >> 'dir 0/file000.txt' && rm -f 'dir 1/data 1.bin' && \
         rm -rf empty-dir && mkdir -p new/dir && echo new > new/dir/file && \
         chmod 600 big.bin && head -c 100000 /dev/urandom > 'dir 2/sub-1/random'",
        q(&src)
    ));
    sh(&format!("rsync {flags} --delete {}/ {}/", q(&src), q(&rs)));
    assert_same(
        "rsync update",
        &portable_manifest(&src),
        &portable_manifest(&rs),
    );
    let todo = sh(&format!(
        "rsync {flags}c --delete -n -i {}/ {}/",
        q(&src),
        q(&rs)
    ));
    assert_eq!(todo.trim(), "", "rsync finds differences after an update");

    // Unmount, mount again: everything is still there.
    let before = full_manifest(&m.mnt);
    m.unmount();
    let m = fx.mount();
    assert_same("after remount", &before, &full_manifest(&m.mnt));
    git(&m.path("repo"), "fsck --full --strict --no-progress");
    sh(&format!(
        "cd {} && sha256sum --quiet --strict -c {}",
        q(&m.path("cp")),
        q(&sums)
    ));
    m.unmount();

    // Each backend alone, read-only: the same tree, and the backend is not changed.
    for b in &fx.backends {
        let snap = backend_snapshot(b);
        assert!(
            !snap.trim().is_empty(),
            "formatted backend {} is empty",
            b.display()
        );
        let m = fx.mount_with(std::slice::from_ref(b), &["-o", "ro"]);
        assert_same(
            &format!("read-only mount of {}", b.display()),
            &before,
            &full_manifest(&m.mnt),
        );
        let err = std::fs::write(m.path("cp/new-file"), b"x").unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(libc::EROFS),
            "write on ro mount: {err}"
        );
        let err = std::fs::create_dir(m.path("newdir")).unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(libc::EROFS),
            "mkdir on ro mount: {err}"
        );
        let err = std::fs::remove_file(m.path("cp/empty")).unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(libc::EROFS),
            "unlink on ro mount: {err}"
        );
        git(&m.path("repo"), "log --oneline");
        m.unmount();
        assert_same(
            &format!("backend {} after a read-only mount", b.display()),
            &snap,
            &backend_snapshot(b),
        );
    }
}

/// Large sequential streams with dd in odd block sizes, compared with cmp, also after a
/// remount; and many processes writing different files at the same time.
#[test]
fn streaming_and_parallel_writers() {
    let fx = Fixture::new(2);
    let data = fx.path("data");
    sh(&format!("head -c 50000017 /dev/urandom > {}", q(&data)));
    let m = fx.mount();
    let big = m.path("big");
    sh(&format!(
        "dd if={} of={} bs=65537 status=none",
        q(&data),
        q(&big)
    ));
    sh(&format!("cmp {} {}", q(&data), q(&big)));
    sh(&format!(
        "dd if={} bs=4093 status=none | cmp - {}",
        q(&big),
        q(&data)
    ));
    sh(&format!(
        "cd {} && mkdir par && seq 1 64 | xargs -P 8 -I N sh -c \
         'head -c $((N * 7919)) {} > par/f.N'",
        q(&m.mnt),
        q(&data)
    ));
    for n in 1..=64u64 {
        let got = std::fs::read(m.path(&format!("par/f.{n}"))).unwrap();
        assert_eq!(got.len() as u64, n * 7919, "par/f.{n}");
    }
    let before = full_manifest(&m.mnt);
    m.unmount();
    let m = fx.mount();
    sh(&format!("cmp {} {}", q(&data), q(&m.path("big"))));
    assert_same("after remount", &before, &full_manifest(&m.mnt));
}

// ---------------------------------------------------------------------------------------
// background mounts
// ---------------------------------------------------------------------------------------

/// Runs `cmd` with stdout and stderr piped and waits until it has exited *and* closed
/// both pipes; panics after `timeout` (a daemon that keeps the caller's pipes open would
/// hang `$(mirrorfs mount ...)` in a script).
fn run_to_eof(cmd: &mut Command, timeout: Duration) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        let _ = tx.send((0, v));
    });
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        let _ = tx2.send((1, v));
    });
    let deadline = Instant::now() + timeout;
    let mut stdout = None;
    let mut stderr = None;
    while stdout.is_none() || stderr.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((0, v)) => stdout = Some(v),
            Ok((_, v)) => stderr = Some(v),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("command did not finish and close its output within {timeout:?}");
            }
        }
    }
    let status = child.wait().expect("wait");
    std::process::Output {
        status,
        stdout: stdout.unwrap(),
        stderr: stderr.unwrap(),
    }
}

/// `mirrorfs mount` without -f returns once the mount is live, leaves a daemon serving it,
/// and the daemon exits by itself after `umount`.
#[test]
fn background_mount_returns_once_live_and_exits_after_umount() {
    let fx = Fixture::new(2);
    let guard = Daemon::new(&fx.mnt);
    let out = run_to_eof(
        Command::new(bin())
            .arg("mount")
            .args(fx.backend_args())
            .arg(&fx.mnt),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "mirrorfs mount failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        is_mounted(&fx.mnt),
        "mirrorfs mount returned before the mount was live"
    );
    assert!(
        !guard.pids().is_empty(),
        "no daemon process serves {}",
        fx.mnt.display()
    );

    std::fs::write(fx.mnt.join("hello"), b"from the background\n").unwrap();
    assert_eq!(
        std::fs::read(fx.mnt.join("hello")).unwrap(),
        b"from the background\n"
    );

    let out = unmount_cmd("umount", &[fx.mnt.display().to_string()]);
    assert!(
        out.status.success(),
        "umount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(&fx.mnt));
    assert!(
        guard.wait_gone(Duration::from_secs(30)),
        "daemon still running after umount"
    );

    // The data written through the background mount is on the backends.
    let m = fx.mount();
    assert_eq!(
        std::fs::read(m.path("hello")).unwrap(),
        b"from the background\n"
    );
    m.unmount();

    // And once more in the background, stopped with fusermount3 this time.
    let out = run_to_eof(
        Command::new(bin())
            .arg("mount")
            .args(fx.backend_args())
            .arg(&fx.mnt),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(&fx.mnt));
    assert_eq!(
        std::fs::read(fx.mnt.join("hello")).unwrap(),
        b"from the background\n"
    );
    assert!(guard.stop(), "daemon did not exit after fusermount3 -u");
}
