//! The command line: bad input is refused with exactly one line on stderr and a non-zero
//! exit status, and changes nothing on disk; the fstab form (through mount.fuse3), the
//! systemd unit's commands and foreground signal handling work.

mod common;

use common::*;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Every entry under `root` (not crossing into mounts) with type, mode, size, owner,
/// mtime, symlink target and content hash: "nothing changed" means this is unchanged.
fn snapshot(root: &Path) -> String {
    sh(&format!(
        "cd {} && find . -xdev -printf '%p %y %m %s %U %G %T@ %l\\n' | sort && \
         find . -xdev -type f -print0 | sort -z | xargs -0 -r sha256sum",
        q(root)
    ))
}

/// Runs `mirrorfs ARGS...` with a 20 s deadline.
fn cli<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    run_timed(Command::new(bin()).args(args), Duration::from_secs(20))
}

/// Asserts the command was refused: non-zero exit and exactly one non-empty line on
/// stderr that mentions one of `needles` (case-insensitive).
#[track_caller]
fn assert_refused(out: &Output, case: &str, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{case}: expected failure, got {} ({err})",
        out.status
    );
    let text = err.trim_end_matches('\n');
    assert!(!text.trim().is_empty(), "{case}: stderr is empty");
    assert_eq!(
        text.lines().count(),
        1,
        "{case}: stderr must be one line, got:\n{err}"
    );
    let low = text.to_lowercase();
    assert!(
        needles.iter().any(|n| low.contains(&n.to_lowercase())),
        "{case}: error does not name the problem (any of {needles:?}): {text}"
    );
}

fn args(parts: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    parts.iter().map(|p| p.as_ref().to_os_string()).collect()
}

// ---------------------------------------------------------------------------------------
// init
// ---------------------------------------------------------------------------------------

#[test]
fn init_refuses_missing_directory() {
    let fx = Fixture::unformatted(2);
    let missing = fx.path("missing");
    let before = snapshot(fx.dir.path());
    let out = cli(args(&[&"init", &fx.backends[0], &missing, &fx.backends[1]]));
    assert_refused(&out, "init with a missing directory", &[&s(&missing)]);
    assert_eq!(before, snapshot(fx.dir.path()), "init changed something");
    assert!(!missing.exists());
}

#[test]
fn init_refuses_non_empty_directory() {
    let fx = Fixture::unformatted(3);
    std::fs::write(fx.backends[1].join("precious.txt"), b"do not lose me\n").unwrap();
    std::fs::create_dir(fx.backends[1].join(".hidden")).unwrap();
    let before = snapshot(fx.dir.path());
    let out = cli(std::iter::once("init".as_ref()).chain(fx.backend_args()));
    assert_refused(
        &out,
        "init of a non-empty directory",
        &[&s(&fx.backends[1])],
    );
    assert_eq!(before, snapshot(fx.dir.path()), "init changed something");
}

#[test]
fn init_refuses_no_backend() {
    let fx = Fixture::unformatted(1);
    let before = snapshot(fx.dir.path());
    let out = run_timed(
        Command::new(bin()).arg("init").current_dir(fx.dir.path()),
        Duration::from_secs(20),
    );
    assert_refused(&out, "init without backends", &["backend"]);
    assert_eq!(before, snapshot(fx.dir.path()), "init changed something");
}

#[test]
fn init_refuses_already_formatted() {
    let fx = Fixture::new(2);
    let fresh = fx.path("fresh");
    std::fs::create_dir(&fresh).unwrap();
    let before = snapshot(fx.dir.path());

    let out = cli(std::iter::once("init".as_ref()).chain(fx.backend_args()));
    let needles = ["already", "formatted", "initiali", "not empty", "non-empty"];
    assert_refused(&out, "init of formatted backends", &needles);
    assert_eq!(before, snapshot(fx.dir.path()), "init changed something");

    // One formatted backend among empty ones: refused as well, the empty one untouched.
    let out = cli(args(&[&"init", &fresh, &fx.backends[0]]));
    assert_refused(&out, "init with one formatted backend", &needles);
    assert_eq!(before, snapshot(fx.dir.path()), "init changed something");
}

#[test]
fn init_refuses_unknown_flag() {
    let fx = Fixture::unformatted(2);
    let before = snapshot(fx.dir.path());
    let out = cli(std::iter::once("init".as_ref()).chain([std::ffi::OsStr::new("--bogus")]));
    assert_refused(&out, "init --bogus", &["bogus"]);
    let out = cli(std::iter::once("init".as_ref())
        .chain([std::ffi::OsStr::new("--bogus")])
        .chain(fx.backend_args()));
    assert_refused(&out, "init --bogus BACKENDS", &["bogus"]);
    assert_eq!(before, snapshot(fx.dir.path()), "init changed something");
}

// ---------------------------------------------------------------------------------------
// mount
// ---------------------------------------------------------------------------------------

/// `mirrorfs mount [-f] BACKENDS... MNT` must fail, leave nothing mounted and nothing
/// running, and change nothing under the fixture directory.
#[track_caller]
fn assert_mount_refused(fx: &Fixture, argv: &[OsString], case: &str, needles: &[&str]) {
    let guard = Daemon::new(&fx.mnt);
    let before = snapshot(fx.dir.path());
    for foreground in [true, false] {
        let mut full: Vec<OsString> = vec!["mount".into()];
        if foreground {
            full.push("-f".into());
        }
        full.extend(argv.iter().cloned());
        let out = cli(&full);
        let case = format!("{case} ({})", if foreground { "-f" } else { "background" });
        assert_refused(&out, &case, needles);
        assert!(
            !is_mounted(&fx.mnt),
            "{case}: {} got mounted",
            fx.mnt.display()
        );
        assert!(
            guard.wait_gone(Duration::from_secs(10)),
            "{case}: a process is left over"
        );
        assert_eq!(
            before,
            snapshot(fx.dir.path()),
            "{case}: something changed on disk"
        );
    }
}

fn mount_args(backends: &[PathBuf], mnt: &Path) -> Vec<OsString> {
    backends
        .iter()
        .map(|b| b.as_os_str().to_os_string())
        .chain([mnt.as_os_str().to_os_string()])
        .collect()
}

#[test]
fn mount_refuses_unformatted_backend() {
    let fx = Fixture::unformatted(2);
    let argv = mount_args(&fx.backends, &fx.mnt);
    let needles = [
        s(&fx.backends[0]),
        s(&fx.backends[1]),
        "format".into(),
        "superblock".into(),
    ];
    let needles: Vec<&str> = needles.iter().map(|s| s.as_str()).collect();
    assert_mount_refused(&fx, &argv, "mount of unformatted backends", &needles);

    // One formatted and one empty directory: the empty one is not a member.
    let out = mirrorfs(["init".as_ref(), fx.backends[0].as_os_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_mount_refused(&fx, &argv, "mount with an unformatted backend", &needles);
}

#[test]
fn mount_refuses_backends_of_two_filesystems() {
    let fx = Fixture::unformatted(2);
    for b in &fx.backends {
        let out = mirrorfs(["init".as_ref(), b.as_os_str()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let argv = mount_args(&fx.backends, &fx.mnt);
    let needles = [
        s(&fx.backends[0]),
        s(&fx.backends[1]),
        "filesystem".into(),
        "different".into(),
        "another".into(),
        "uuid".into(),
    ];
    let needles: Vec<&str> = needles.iter().map(|s| s.as_str()).collect();
    assert_mount_refused(&fx, &argv, "mount of backends of two filesystems", &needles);
}

#[test]
fn mount_refuses_missing_mountpoint() {
    let fx = Fixture::new(2);
    let missing = fx.path("no-such-dir");
    let argv = mount_args(&fx.backends, &missing);
    assert_mount_refused(&fx, &argv, "mount on a missing mountpoint", &[&s(&missing)]);
    assert!(!missing.exists());
}

#[test]
fn mount_refuses_missing_backend_directory() {
    let fx = Fixture::new(2);
    let missing = fx.path("no-such-backend");
    let mut backends = fx.backends.clone();
    backends.push(missing.clone());
    let argv = mount_args(&backends, &fx.mnt);
    assert_mount_refused(&fx, &argv, "mount with a missing backend", &[&s(&missing)]);
}

#[test]
fn mount_refuses_busy_mountpoint() {
    let fx = Fixture::new(2);
    let m = fx.mount();
    std::fs::write(m.path("mine"), b"first mount\n").unwrap();

    let other = Fixture::new(2);
    let before_other = snapshot(other.dir.path());
    let needles = [s(&fx.mnt), "busy".into(), "mounted".into(), "in use".into()];
    let needles: Vec<&str> = needles.iter().map(|s| s.as_str()).collect();
    for fg in [&["-f"][..], &[][..]] {
        let mut argv: Vec<OsString> = vec!["mount".into()];
        argv.extend(fg.iter().map(OsString::from));
        argv.extend(mount_args(&other.backends, &fx.mnt));
        let out = cli(&argv);
        assert_refused(&out, "mount on a mounted mountpoint", &needles);
        assert_eq!(
            before_other,
            snapshot(other.dir.path()),
            "other backends changed"
        );
    }
    // The first mount is unaffected and still the one at the mountpoint.
    assert_eq!(std::fs::read(m.path("mine")).unwrap(), b"first mount\n");
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let count = info
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(&s(&fx.mnt)))
        .count();
    assert_eq!(count, 1, "mountpoint stacked:\n{info}");
    m.unmount();
}

#[test]
fn mount_refuses_no_backend() {
    let fx = Fixture::new(2);
    let argv = vec![fx.mnt.as_os_str().to_os_string()];
    assert_mount_refused(&fx, &argv, "mount without backends", &["backend"]);
    let before = snapshot(fx.dir.path());
    let out = cli(["mount"]);
    assert_refused(&out, "mount without arguments", &["backend", "mountpoint"]);
    assert_eq!(before, snapshot(fx.dir.path()));
}

#[test]
fn mount_refuses_unknown_options() {
    let fx = Fixture::new(2);
    let mut argv: Vec<OsString> = vec!["-o".into(), "bogus".into()];
    argv.extend(mount_args(&fx.backends, &fx.mnt));
    assert_mount_refused(&fx, &argv, "mount -o bogus", &["bogus"]);

    let mut argv: Vec<OsString> = vec!["-o".into(), "allow_other,bogus=1,ro".into()];
    argv.extend(mount_args(&fx.backends, &fx.mnt));
    assert_mount_refused(&fx, &argv, "mount -o allow_other,bogus=1,ro", &["bogus"]);

    let mut argv = mount_args(&fx.backends, &fx.mnt);
    argv.extend(["-o".into(), "bogus".into()]);
    assert_mount_refused(&fx, &argv, "mount ... -o bogus (options last)", &["bogus"]);

    let mut argv: Vec<OsString> = vec!["--bogus".into()];
    argv.extend(mount_args(&fx.backends, &fx.mnt));
    assert_mount_refused(&fx, &argv, "mount --bogus", &["bogus"]);

    // The mount.fuse3 form, without a subcommand.
    let guard = Daemon::new(&fx.mnt);
    let before = snapshot(fx.dir.path());
    let source = fx
        .backends
        .iter()
        .map(|b| s(b))
        .collect::<Vec<_>>()
        .join(":");
    let out = cli([source.as_str(), &s(&fx.mnt), "-o", "rw,bogus"]);
    assert_refused(&out, "mirrorfs SOURCE MNT -o rw,bogus", &["bogus"]);
    assert!(!is_mounted(&fx.mnt));
    assert!(guard.wait_gone(Duration::from_secs(10)));
    assert_eq!(before, snapshot(fx.dir.path()));
}

#[test]
fn mount_refuses_backends_mounted_elsewhere() {
    let fx = Fixture::new(2);
    let m = fx.mount();
    std::fs::write(m.path("data"), b"live\n").unwrap();
    // Make the live mount quiescent: its metadata updates may otherwise still be on their
    // way to the backends while the snapshots below are taken.
    std::fs::File::open(m.path("data"))
        .unwrap()
        .sync_all()
        .unwrap();
    std::fs::File::open(&m.mnt).unwrap().sync_all().unwrap();
    let mnt2 = fx.path("mnt2");
    std::fs::create_dir(&mnt2).unwrap();
    let guard = Daemon::new(&mnt2);
    let needles = ["mounted", "in use", "busy", "lock", "already"];

    let backends_before: Vec<String> = fx.backends.iter().map(|b| snapshot(b)).collect();
    let subsets = [fx.backends.clone(), vec![fx.backends[1].clone()]];
    for backends in &subsets {
        for fg in [true, false] {
            let mut argv: Vec<OsString> = vec!["mount".into()];
            if fg {
                argv.push("-f".into());
            }
            argv.extend(mount_args(backends, &mnt2));
            let out = cli(&argv);
            let case = format!("second mount of {backends:?} (fg={fg})");
            assert_refused(&out, &case, &needles);
            assert!(!is_mounted(&mnt2), "{case}: mounted twice");
            assert!(
                guard.wait_gone(Duration::from_secs(10)),
                "{case}: process left over"
            );
        }
    }
    let backends_after: Vec<String> = fx.backends.iter().map(|b| snapshot(b)).collect();
    assert_eq!(
        backends_before, backends_after,
        "refused mounts changed the backends"
    );
    assert_eq!(std::fs::read_dir(&mnt2).unwrap().count(), 0);

    // The first mount still works.
    std::fs::write(m.path("data"), b"still live\n").unwrap();
    assert_eq!(std::fs::read(m.path("data")).unwrap(), b"still live\n");
    m.unmount();

    // Once it is unmounted, the backends can be mounted at the other place.
    let m2 = Mount::start(&fx.backends, &mnt2, &[]);
    assert_eq!(std::fs::read(m2.path("data")).unwrap(), b"still live\n");
    m2.unmount();
}

// ---------------------------------------------------------------------------------------
// fstab (mount.fuse3), colon lists, systemd unit, signals
// ---------------------------------------------------------------------------------------

fn mount_fuse3() -> PathBuf {
    for dir in ["/sbin", "/usr/sbin", "/bin", "/usr/bin"] {
        let p = Path::new(dir).join("mount.fuse3");
        if p.exists() {
            return p;
        }
    }
    panic!("mount.fuse3 not found (install fuse3)");
}

/// PATH with the directory of the binary under test first, as if it were installed.
fn path_with_bin() -> OsString {
    let dir = Path::new(bin()).parent().unwrap();
    let mut p = dir.as_os_str().to_os_string();
    p.push(":");
    p.push(std::env::var_os("PATH").unwrap_or_default());
    p
}

/// The (source, mountpoint, type, options) of the entry in mount-scripts/fstab.example.
fn fstab_example() -> (String, String, String, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("mount-scripts/fstab.example");
    let text = std::fs::read_to_string(&path).expect("read fstab.example");
    let mut entries = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>());
    let e = entries.next().expect("an entry in fstab.example");
    assert_eq!(e.len(), 6, "fstab entries have six fields: {e:?}");
    assert!(
        entries.next().is_none(),
        "one entry expected in fstab.example"
    );
    (e[0].clone(), e[1].clone(), e[2].clone(), e[3].clone())
}

/// The fstab.example line, with our backends and mountpoint, mounted the way mount(8)
/// does it: `mount.fuse3 SOURCE MNT -t fuse.mirrorfs -o OPTIONS`, which runs
/// `mirrorfs SOURCE MNT -o OPTIONS` from PATH and must return once the mount is live.
#[test]
fn fstab_entry_mounts_through_mount_fuse3() {
    let (source, _, fstype, options) = fstab_example();
    assert_eq!(fstype, "fuse.mirrorfs");
    assert_eq!(
        source.split(':').count(),
        2,
        "example source lists two backends: {source}"
    );
    assert!(
        options.contains("nofail"),
        "example should not block boot: {options}"
    );

    let fx = Fixture::new(2);
    let source = fx
        .backends
        .iter()
        .map(|b| s(b))
        .collect::<Vec<_>>()
        .join(":");
    let guard = Daemon::new(&fx.mnt);
    let out = run_timed(
        Command::new(mount_fuse3())
            .arg(&source)
            .arg(&fx.mnt)
            .args(["-t", &fstype, "-o", &options])
            .env("PATH", path_with_bin()),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "mount.fuse3 failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        is_mounted(&fx.mnt),
        "mount.fuse3 returned before the mount was live"
    );
    assert!(!guard.pids().is_empty(), "no process serves the mount");
    if options.split(',').any(|o| o == "allow_other") {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = info
            .lines()
            .find(|l| l.split(' ').nth(4) == Some(&s(&fx.mnt)))
            .unwrap();
        assert!(
            line.contains("allow_other"),
            "allow_other not applied: {line}"
        );
    }

    std::fs::create_dir(fx.mnt.join("dir")).unwrap();
    std::fs::write(fx.mnt.join("dir/file"), b"via fstab\n").unwrap();
    assert_eq!(
        std::fs::read(fx.mnt.join("dir/file")).unwrap(),
        b"via fstab\n"
    );

    assert!(guard.stop(), "mirrorfs did not exit after fusermount3 -u");
    assert!(!is_mounted(&fx.mnt));

    let m = fx.mount();
    assert_eq!(std::fs::read(m.path("dir/file")).unwrap(), b"via fstab\n");
    m.unmount();
}

/// `mount.fuse3 BACKEND MNT -t fuse.mirrorfs -o ro` with a single backend: a read-only
/// view that leaves the backend untouched; stopped with `umount`.
#[test]
fn fstab_read_only_single_backend() {
    let fx = Fixture::new(2);
    {
        let m = fx.mount();
        std::fs::write(m.path("kept"), b"written read-write\n").unwrap();
        m.unmount();
    }
    let before = snapshot(&fx.backends[1]);
    let guard = Daemon::new(&fx.mnt);
    let out = run_timed(
        Command::new(mount_fuse3())
            .arg(&fx.backends[1])
            .arg(&fx.mnt)
            .args([
                "-t",
                "fuse.mirrorfs",
                "-o",
                "ro,nodev,nosuid,noatime,_netdev",
            ])
            .env("PATH", path_with_bin()),
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(&fx.mnt));
    assert_eq!(
        std::fs::read(fx.mnt.join("kept")).unwrap(),
        b"written read-write\n"
    );
    let err = std::fs::write(fx.mnt.join("new"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let out = unmount_cmd("umount", &[s(&fx.mnt)]);
    assert!(
        out.status.success(),
        "umount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        guard.wait_gone(Duration::from_secs(30)),
        "daemon still running after umount"
    );
    assert_eq!(
        before,
        snapshot(&fx.backends[1]),
        "read-only mount changed the backend"
    );
}

/// Colon-separated backend list with options after the positionals, in the foreground.
#[test]
fn colon_list_with_trailing_options_in_foreground() {
    let fx = Fixture::new(3);
    {
        let m = fx.mount();
        std::fs::write(m.path("f"), b"abc").unwrap();
        m.unmount();
    }
    let source = fx
        .backends
        .iter()
        .map(|b| s(b))
        .collect::<Vec<_>>()
        .join(":");
    let guard = Daemon::new(&fx.mnt);
    let mut child = Command::new(bin())
        .args([
            "mount",
            "-f",
            &source,
            &s(&fx.mnt),
            "-o",
            "ro,noatime,fsname=mirror-test",
        ])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !is_mounted(&fx.mnt) {
        assert!(child.try_wait().unwrap().is_none(), "mirrorfs exited early");
        assert!(Instant::now() < deadline, "mount did not become live");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(std::fs::read(fx.mnt.join("f")).unwrap(), b"abc");
    let err = std::fs::write(fx.mnt.join("f"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    assert!(
        guard.stop(),
        "foreground mirrorfs did not exit after fusermount3 -u"
    );
    let status = child.wait().unwrap();
    assert!(status.success(), "mirrorfs -f exited with {status}");
}

/// SIGTERM and SIGINT stop a foreground mount cleanly: unmounted, exit status 0, and the
/// data is there at the next mount.
#[test]
fn foreground_mount_stops_cleanly_on_sigterm_and_sigint() {
    let fx = Fixture::new(2);
    let guard = Daemon::new(&fx.mnt);
    for (i, sig) in [libc::SIGTERM, libc::SIGINT].into_iter().enumerate() {
        let mut child = Command::new(bin())
            .arg("mount")
            .arg("-f")
            .args(fx.backend_args())
            .arg(&fx.mnt)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(&fx.mnt) {
            assert!(child.try_wait().unwrap().is_none(), "mirrorfs exited early");
            assert!(Instant::now() < deadline, "mount did not become live");
            std::thread::sleep(Duration::from_millis(20));
        }
        if i > 0 {
            let prev = std::fs::read(fx.mnt.join(format!("file{}", i - 1))).unwrap();
            assert_eq!(prev, format!("signal {}", i - 1).as_bytes());
        }
        std::fs::write(fx.mnt.join(format!("file{i}")), format!("signal {i}")).unwrap();
        unsafe { libc::kill(child.id() as i32, sig) };
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("mirrorfs -f still running 30 s after signal {sig}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(status.success(), "exit status after signal {sig}: {status}");
        assert!(!is_mounted(&fx.mnt), "still mounted after signal {sig}");
    }
    let m = fx.mount();
    assert_eq!(std::fs::read(m.path("file1")).unwrap(), b"signal 1");
    m.unmount();
    drop(guard);
}

/// The commands of mount-scripts/mirrorfs@.service, with the variables of a configuration
/// like mirrorfs-example.conf, as systemd would run them.
#[test]
fn systemd_unit_commands_mount_and_stop() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("mount-scripts");
    let unit = std::fs::read_to_string(dir.join("mirrorfs@.service")).unwrap();
    let conf = std::fs::read_to_string(dir.join("mirrorfs-example.conf")).unwrap();
    let key = |text: &str, k: &str| -> String {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
            .unwrap_or_else(|| panic!("{k}= missing"))
            .to_string()
    };
    assert!(key(&conf, "BACKENDS").split_whitespace().count() >= 2);
    assert!(key(&conf, "MOUNTPOINT").starts_with('/'));
    assert_eq!(key(&unit, "Type"), "simple");
    assert_eq!(key(&unit, "Restart"), "on-failure");
    assert!(key(&unit, "After").contains("local-fs.target"));
    assert_eq!(key(&unit, "EnvironmentFile"), "/etc/mirrorfs/%i.conf");

    let fx = Fixture::new(3);
    let backends: Vec<String> = fx.backends.iter().map(|b| s(b)).collect();
    // systemd splits unbraced $VAR on whitespace and keeps ${VAR} as one argument.
    let expand = |line: &str| -> Vec<String> {
        line.split_whitespace()
            .flat_map(|w| match w {
                "$BACKENDS" => backends.clone(),
                "${MOUNTPOINT}" | "$MOUNTPOINT" => vec![s(&fx.mnt)],
                w => vec![w.to_string()],
            })
            .collect()
    };
    let start = expand(&key(&unit, "ExecStart"));
    let stop = expand(&key(&unit, "ExecStop"));
    assert!(start[0].ends_with("/mirrorfs"), "{start:?}");
    assert!(
        start.contains(&"-f".to_string()),
        "Type=simple needs the foreground: {start:?}"
    );
    assert!(stop[0].ends_with("/fusermount3"), "{stop:?}");

    let guard = Daemon::new(&fx.mnt);
    let mut child = Command::new(bin())
        .args(&start[1..])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !is_mounted(&fx.mnt) {
        assert!(
            child.try_wait().unwrap().is_none(),
            "ExecStart exited early"
        );
        assert!(Instant::now() < deadline, "mount did not become live");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(fx.mnt.join("unit"), b"ok").unwrap();
    let out = unmount_cmd("fusermount3", &stop[1..]);
    assert!(
        out.status.success(),
        "ExecStop: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "ExecStart process still running after ExecStop"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "a failure status would make systemd restart it: {status}"
    );
    drop(guard);
    let m = fx.mount();
    assert_eq!(std::fs::read(m.path("unit")).unwrap(), b"ok");
}
