//! Failure handling on real mounts, driven through the `mirrorfs` binary: a backend whose
//! filesystem turns read-only or fills up while files are being written, split brain after
//! two single-backend mounts, disabling, recovering (online, while writing, and resumed after
//! an unmount) and replacing a backend, the quorum rule, and bad input to the management
//! commands (`status`, `disable`, `recover`, `replace`).
//!
//! Faulty backends live on their own tmpfs, mounted inside the fixture directory and
//! unmounted by a guard, after the mirror itself, even when a test panics. Every test ends by
//! mounting each backend alone, read-only, and checking that all of them hold the same tree
//! and exactly the bytes that were acknowledged.

mod common;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::Value;
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io::{Read, Seek, Write};
use std::os::unix::io::IntoRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------
// helpers: commands
// ---------------------------------------------------------------------------------------

/// errno of a write refused for lack of quorum.
const EROFS: i32 = 30;

/// How long a `recover --wait` or `replace --wait` may take before the test gives up.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(240);

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn canon(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|e| panic!("canonicalize {}: {e}", p.display()))
}

fn os(parts: &[&dyn AsRef<OsStr>]) -> Vec<OsString> {
    parts.iter().map(|p| p.as_ref().to_os_string()).collect()
}

/// Runs `mirrorfs ARGS...` with a deadline.
fn run_for(args: &[OsString], timeout: Duration) -> Output {
    run_timed(Command::new(bin()).args(args), timeout)
}

/// Runs `mirrorfs ARGS...` with a 60 s deadline.
fn run(args: &[&dyn AsRef<OsStr>]) -> Output {
    run_for(&os(args), Duration::from_secs(60))
}

/// Asserts the command failed with exactly one non-empty line of explanation (on stderr, or
/// on stdout when stderr is empty) and returns that line.
#[track_caller]
fn assert_refused(out: &Output, what: &str) -> String {
    assert!(
        !out.status.success(),
        "{what}: expected a refusal, got success:\n{}",
        text(out)
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let msg = if err.trim().is_empty() {
        String::from_utf8_lossy(&out.stdout).into_owned()
    } else {
        err
    };
    let lines: Vec<&str> = msg.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: expected one line of explanation, got {}:\n{}",
        lines.len(),
        text(out)
    );
    lines[0].to_string()
}

/// Formats the given backends with `mirrorfs init`.
fn init(backends: &[PathBuf]) {
    let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"init"];
    for b in backends {
        args.push(b);
    }
    assert_ok(&run(&args), "mirrorfs init");
}

/// `mirrorfs mount -f EXTRA... BACKENDS... MNT` must be refused: non-zero exit, one line,
/// nothing mounted. A mount that wrongly comes up is unmounted before the test fails.
/// Returns the line.
#[track_caller]
fn assert_mount_refused(backends: &[PathBuf], mnt: &Path, extra: &[&str], what: &str) -> String {
    let mut args: Vec<OsString> = vec!["mount".into(), "-f".into()];
    args.extend(extra.iter().map(OsString::from));
    args.extend(backends.iter().map(|b| b.as_os_str().to_os_string()));
    args.push(mnt.as_os_str().to_os_string());
    let mut err_f = tempfile::tempfile().expect("tempfile");
    let mut child = Command::new(bin())
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err_f.try_clone().unwrap())
        .spawn()
        .expect("spawn mirrorfs mount");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if is_mounted(mnt) || Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let Some(status) = status else {
        let mounted = is_mounted(mnt);
        for flag in ["-u", "-uz"] {
            if is_mounted(mnt) {
                let _ = Command::new("fusermount3").arg(flag).arg(mnt).status();
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("{what}: `mirrorfs {args:?}` was not refused (mounted: {mounted})");
    };
    let mut stderr = Vec::new();
    err_f.rewind().unwrap();
    err_f.read_to_end(&mut stderr).unwrap();
    assert!(
        !is_mounted(mnt),
        "{what}: refused, yet something is mounted"
    );
    assert_refused(
        &Output {
            status,
            stdout: Vec::new(),
            stderr,
        },
        what,
    )
}

// ---------------------------------------------------------------------------------------
// helpers: status
// ---------------------------------------------------------------------------------------

/// `mirrorfs status MNT`: exit code and text.
fn status(mnt: &Path) -> (i32, String) {
    let out = run(&[&"status", &mnt]);
    (code(&out), text(&out))
}

/// `mirrorfs status MNT --json`: exit code and the parsed object.
fn status_json(mnt: &Path) -> (i32, Value) {
    let out = run(&[&"status", &mnt, &"--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json (exit {}) is not JSON: {e}\n{}",
            code(&out),
            text(&out)
        )
    });
    assert!(v.is_object(), "status --json is not an object: {v}");
    (code(&out), v)
}

fn members(st: &Value) -> &Vec<Value> {
    st["backends"]
        .as_array()
        .unwrap_or_else(|| panic!("status --json has no backends array: {st:#}"))
}

/// The status entry of the backend at `path` (compared by canonical location).
#[track_caller]
fn member<'a>(st: &'a Value, path: &Path) -> &'a Value {
    let want = s(&canon(path));
    members(st)
        .iter()
        .find(|m| m["location"].as_str() == Some(want.as_str()))
        .unwrap_or_else(|| panic!("no backend with location {want} in status:\n{st:#}"))
}

#[track_caller]
fn member_by_id(st: &Value, id: u64) -> &Value {
    members(st)
        .iter()
        .find(|m| m["id"].as_u64() == Some(id))
        .unwrap_or_else(|| panic!("no backend with id {id} in status:\n{st:#}"))
}

#[track_caller]
fn member_id(st: &Value, path: &Path) -> u64 {
    let m = member(st, path);
    m["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("backend without numeric id: {m}"))
}

fn state_of(m: &Value) -> &str {
    m["state"].as_str().unwrap_or("<no state>")
}

fn reason_of(m: &Value) -> String {
    m["reason"].as_str().unwrap_or("").to_string()
}

/// Polls `status --json` until `done` holds for it; panics with the last status after
/// `timeout`.
#[track_caller]
fn wait_status(mnt: &Path, what: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (_, st) = status_json(mnt);
        if done(&st) {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; last status:\n{st:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Asserts `status` and `status --json` both say the whole mirror is optimal.
#[track_caller]
fn assert_all_optimal(mnt: &Path, what: &str) {
    let (c, t) = status(mnt);
    assert_eq!(c, 0, "{what}: status should exit 0 (optimal):\n{t}");
    let (c, st) = status_json(mnt);
    assert_eq!(c, 0, "{what}: status --json should exit 0:\n{st:#}");
    assert_eq!(st["state"], "optimal", "{what}: array state:\n{st:#}");
    for m in members(&st) {
        assert_eq!(
            state_of(m),
            "optimal",
            "{what}: backend not optimal:\n{st:#}"
        );
        assert!(m["recovery"].is_null(), "{what}: recovery shown:\n{st:#}");
    }
}

/// Checks the fields every backend entry must carry.
#[track_caller]
fn assert_status_shape(st: &Value) {
    for key in ["mountpoint", "fs_uuid", "state"] {
        assert!(st[key].is_string(), "status --json lacks {key}:\n{st:#}");
    }
    for key in ["generation", "min_optimal"] {
        assert!(st[key].is_u64(), "status --json lacks {key}:\n{st:#}");
    }
    for m in members(st) {
        assert!(m["id"].is_u64(), "backend lacks id: {m}");
        for key in ["location", "state", "reason"] {
            assert!(m[key].is_string(), "backend lacks {key}: {m}");
        }
        for key in [
            "reads",
            "writes",
            "read_errors",
            "write_errors",
            "checksum_errors",
        ] {
            assert!(m[key].is_u64(), "backend lacks counter {key}: {m}");
        }
        assert!(
            m["recovery"].is_null() || m["recovery"].is_object(),
            "backend recovery is neither null nor an object: {m}"
        );
        if state_of(m) == "optimal" {
            assert_eq!(reason_of(m), "", "optimal backend with a reason: {m}");
        } else {
            assert!(
                !reason_of(m).is_empty(),
                "non-optimal backend without reason: {m}"
            );
        }
    }
}

/// Asserts a recovery progress object is well-formed.
#[track_caller]
fn assert_progress(m: &Value) {
    let r = &m["recovery"];
    assert!(r.is_object(), "recovering backend shows no progress: {m}");
    let num = |k: &str| {
        r[k].as_u64()
            .unwrap_or_else(|| panic!("recovery lacks numeric {k}: {m}"))
    };
    assert!(
        num("objects_done") <= num("objects_total"),
        "progress past total: {m}"
    );
    assert!(
        num("bytes_done") <= num("bytes_total"),
        "progress past total: {m}"
    );
    num("rate_bytes_per_sec");
}

// ---------------------------------------------------------------------------------------
// helpers: trees and contents
// ---------------------------------------------------------------------------------------

/// Every regular file under `root`, by relative path.
fn files_under(root: &Path) -> BTreeMap<String, PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, PathBuf>) {
        let entries =
            std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
        for entry in entries {
            let entry = entry.unwrap();
            let p = entry.path();
            let ft = entry.file_type().unwrap();
            if ft.is_dir() {
                walk(root, &p, out);
            } else if ft.is_file() {
                let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
                out.insert(rel, p);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The regular files under `root` must be exactly `want`, byte for byte.
#[track_caller]
fn check_contents(root: &Path, want: &BTreeMap<String, Vec<u8>>, what: &str) {
    let got = files_under(root);
    let missing: Vec<&String> = want
        .keys()
        .filter(|k| !got.contains_key(*k))
        .take(10)
        .collect();
    let extra: Vec<&String> = got
        .keys()
        .filter(|k| !want.contains_key(*k))
        .take(10)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: files differ ({} expected, {} found)\nmissing: {missing:?}\nunexpected: {extra:?}",
        want.len(),
        got.len()
    );
    let mut bad = Vec::new();
    for (rel, data) in want {
        match std::fs::read(&got[rel]) {
            Ok(d) if d == *data => {}
            Ok(d) => bad.push(format!("{rel}: {} bytes, want {}", d.len(), data.len())),
            Err(e) => bad.push(format!("{rel}: {e}")),
        }
    }
    assert!(
        bad.is_empty(),
        "{what}: {} of {} files have wrong contents: {:?}",
        bad.len(),
        want.len(),
        &bad[..bad.len().min(10)]
    );
}

/// Mounts each backend alone, read-only, at `mnt`: each must show `manifest` and `want`.
#[track_caller]
fn check_each_backend_alone(
    backends: &[PathBuf],
    mnt: &Path,
    manifest: &str,
    want: &BTreeMap<String, Vec<u8>>,
) {
    for b in backends {
        let m = Mount::start(std::slice::from_ref(b), mnt, &["-o", "ro"]);
        let what = format!("{} alone, read-only", b.display());
        assert_same(&what, manifest, &tree_manifest(mnt));
        check_contents(mnt, want, &what);
        m.unmount();
    }
}

/// Every entry of a directory (not crossing mounts) with type, mode, size and content hash:
/// "unchanged" means this is unchanged.
fn snapshot(root: &Path) -> String {
    sh(&format!(
        "cd {} && find . -xdev -printf '%p %y %m %s %T@ %l\\n' | sort && \
         find . -xdev -type f -print0 | sort -z | xargs -0 -r sha256sum",
        q(root)
    ))
}

/// Writes `n` files of random sizes up to `max` bytes under `root/dir`, recording them in
/// `model` under their path relative to `root`.
fn write_files(
    root: &Path,
    dir: &str,
    n: usize,
    max: usize,
    rng: &mut StdRng,
    model: &mut BTreeMap<String, Vec<u8>>,
) {
    std::fs::create_dir_all(root.join(dir)).unwrap();
    for i in 0..n {
        let rel = format!("{dir}/file-{i:04}");
        let len = rng.gen_range(0..=max);
        let data = random_bytes(rng, len);
        std::fs::write(root.join(&rel), &data).unwrap_or_else(|e| panic!("write {rel}: {e}"));
        model.insert(rel, data);
    }
}

fn random_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rng.fill_bytes(&mut v);
    v
}

/// Closes `f` and reports the error of close(2), which `drop` would swallow.
fn close(f: std::fs::File) -> std::io::Result<()> {
    let fd = f.into_raw_fd();
    // SAFETY: `fd` was just taken out of the File, so it is open and closed exactly once.
    if unsafe { libc::close(fd) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

// ---------------------------------------------------------------------------------------
// helpers: a writer running in the background
// ---------------------------------------------------------------------------------------

type Acked = Vec<(String, Vec<u8>)>;

/// A thread that creates files of random content under `MNT/DIR` one after the other until
/// told to stop. A file counts as acknowledged once write_all and close both returned Ok.
/// The first error stops the thread and fails the test at the next check.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Acked>>,
    handle: Option<JoinHandle<Result<(), String>>>,
}

impl Writer {
    fn start(mnt: &Path, dir: &str, seed: u64, max: usize) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (mnt, dir) = (mnt.to_path_buf(), dir.to_string());
        let (stop2, acked2) = (stop.clone(), acked.clone());
        let handle = std::thread::spawn(move || -> Result<(), String> {
            let mut rng = StdRng::seed_from_u64(seed);
            std::fs::create_dir_all(mnt.join(&dir)).map_err(|e| format!("mkdir {dir}: {e}"))?;
            for i in 0..100_000 {
                if stop2.load(Ordering::SeqCst) {
                    break;
                }
                let rel = format!("{dir}/w-{i:06}");
                let len = rng.gen_range(1..=max);
                let data = random_bytes(&mut rng, len);
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(mnt.join(&rel))
                    .map_err(|e| format!("create {rel}: {e}"))?;
                f.write_all(&data)
                    .map_err(|e| format!("write {rel}: {e}"))?;
                close(f).map_err(|e| format!("close {rel}: {e}"))?;
                acked2.lock().unwrap().push((rel, data));
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        });
        Writer {
            stop,
            acked,
            handle: Some(handle),
        }
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Fails the test if the writer stopped with an error.
    #[track_caller]
    fn check(&mut self) {
        if self.handle.as_ref().is_some_and(|h| h.is_finished()) {
            let res = self.handle.take().unwrap().join();
            match res {
                Ok(Ok(())) => panic!("writer stopped early after {} files", self.count()),
                Ok(Err(e)) => panic!("writer failed after {} files: {e}", self.count()),
                Err(_) => panic!("writer panicked"),
            }
        }
    }

    /// Waits until at least `n` files are acknowledged.
    #[track_caller]
    fn wait_count(&mut self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.count() < n {
            self.check();
            assert!(
                Instant::now() < deadline,
                "writer acknowledged only {} of {n} files in {timeout:?}",
                self.count()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.check();
    }

    /// Stops the writer and returns every acknowledged file; fails the test on an error.
    #[track_caller]
    fn finish(mut self) -> Acked {
        self.check();
        self.stop.store(true, Ordering::SeqCst);
        let h = self.handle.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !h.is_finished() {
            assert!(
                Instant::now() < deadline,
                "writer does not stop (hung write?)"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        match h.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("writer failed after {} files: {e}", self.count()),
            Err(_) => panic!("writer panicked"),
        }
        std::mem::take(&mut *self.acked.lock().unwrap())
    }
}

impl Drop for Writer {
    /// Stops the thread; a thread stuck in a hung mount is left behind, the mount guard
    /// (dropped next) aborts the mount and with it the stuck call.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// helpers: a tmpfs for one backend
// ---------------------------------------------------------------------------------------

/// A tmpfs mounted at `dir` (created), unmounted with everything mounted under it when
/// dropped. Declare it after the fixture and before the mirror's [`Mount`], so that the
/// mirror is gone before the tmpfs is unmounted and the tmpfs before the fixture directory
/// is removed.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn new(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir(dir).unwrap();
        sh(&format!(
            "mount -t tmpfs -o size={size},mode=0755 mirrorfs-test {}",
            q(dir)
        ));
        Tmpfs {
            dir: dir.to_path_buf(),
        }
    }

    fn resize(&self, size: &str) {
        sh(&format!("mount -o remount,size={size} {}", q(&self.dir)));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while is_mounted(&self.dir) {
            let _ = Command::new("umount")
                .arg("-R")
                .arg(&self.dir)
                .stderr(Stdio::null())
                .status();
            if Instant::now() > deadline {
                let _ = Command::new("umount").arg("-Rl").arg(&self.dir).status();
                break;
            }
            if is_mounted(&self.dir) {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Remounts the whole tmpfs read-only under the running mirror, as the kernel does to a
/// disk after an error. The mirror keeps no file of a backend open for writing between
/// calls, so the remount only has to wait for a write in progress (EBUSY): it is retried.
fn make_read_only(tmpfs: &Tmpfs) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&tmpfs.dir)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        if status.success() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "could not remount the tmpfs read-only"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Undoes [`make_read_only`].
fn make_writable(tmpfs: &Tmpfs) {
    sh(&format!("mount -o remount,rw {}", q(&tmpfs.dir)));
}

/// Some spelling of `p` other than `p` that canonicalizes to it.
fn other_spelling(p: &Path) -> PathBuf {
    let name = p.file_name().unwrap();
    p.parent().unwrap().join(".").join(name).join(".")
}

// ---------------------------------------------------------------------------------------
// a backend fails while files are being written
// ---------------------------------------------------------------------------------------

/// Three backends, one on a tmpfs. The tmpfs backend turns read-only (or full, `fault`)
/// while a writer creates files; writes must go on without a single error, status exits 2
/// and names the backend with a reason matching `needles`. After the fault is cleared
/// (`clear`), `recover --wait` brings it back; every acknowledged file is there, through
/// the mount and through each backend alone.
fn backend_fails_mid_stream(
    tmpfs_size: &str,
    fault: impl FnOnce(&Tmpfs, &Path),
    clear: impl FnOnce(&Tmpfs, &Path),
    needles: &[&str],
) {
    if !is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let fx = Fixture::unformatted(2);
    let tmp = Tmpfs::new(&fx.path("tmpfs"), tmpfs_size);
    let tb = tmp.dir.join("b");
    std::fs::create_dir(&tb).unwrap();
    let backends = vec![fx.backends[0].clone(), tb.clone(), fx.backends[1].clone()];
    init(&backends);
    let m = Mount::start(&backends, &fx.mnt, &[]);
    assert_all_optimal(&fx.mnt, "fresh mount");

    let mut w = Writer::start(&fx.mnt, "stream", 7, 48 << 10);
    w.wait_count(30, Duration::from_secs(60));
    fault(&tmp, &tb);
    let at_fault = w.count();

    // The mount notices at its next write to the backend; the writer must not.
    let st = wait_status(
        &fx.mnt,
        "the tmpfs backend degraded",
        Duration::from_secs(60),
        |st| state_of(member(st, &tb)) == "degraded",
    );
    w.wait_count(at_fault + 50, Duration::from_secs(60));
    assert_status_shape(&st);
    let reason = reason_of(member(&st, &tb)).to_lowercase();
    assert!(
        needles.iter().any(|n| reason.contains(n)),
        "reason should mention one of {needles:?}: {st:#}"
    );
    for b in [&fx.backends[0], &fx.backends[1]] {
        assert_eq!(state_of(member(&st, b)), "optimal", "{st:#}");
    }
    let (c, t) = status(&fx.mnt);
    assert_eq!(c, 2, "status should exit 2 with a degraded backend:\n{t}");
    assert!(
        t.contains(&s(&canon(&tb))) || t.contains(&s(&tb)),
        "status does not name the degraded backend {}:\n{t}",
        tb.display()
    );
    let low = t.to_lowercase();
    assert!(
        needles.iter().any(|n| low.contains(n)),
        "status does not give the reason (any of {needles:?}):\n{t}"
    );
    let (c, st) = status_json(&fx.mnt);
    assert_eq!(c, 2, "status --json should exit 2:\n{st:#}");
    assert_eq!(st["state"], "degraded", "{st:#}");

    let mut want: BTreeMap<String, Vec<u8>> = w.finish().into_iter().collect();
    clear(&tmp, &tb);
    let out = run_for(
        &os(&[&"recover", &fx.mnt, &other_spelling(&tb), &"--wait"]),
        RECOVERY_TIMEOUT,
    );
    assert_ok(&out, "recover --wait of the tmpfs backend");
    assert_all_optimal(&fx.mnt, "after recovery");

    // The recovered backend takes writes again.
    let mut rng = StdRng::seed_from_u64(8);
    write_files(&fx.mnt, "after", 20, 20_000, &mut rng, &mut want);
    assert_all_optimal(&fx.mnt, "after writing to the recovered mirror");
    check_contents(&fx.mnt, &want, "through the mount");
    let manifest = tree_manifest(&fx.mnt);
    m.unmount();
    check_each_backend_alone(&backends, &fx.mnt, &manifest, &want);
}

#[test]
fn tmpfs_readonly_mid_stream() {
    backend_fails_mid_stream(
        "64m",
        |t, _| make_read_only(t),
        |t, _| make_writable(t),
        &["read-only", "read only", "erofs"],
    );
}

#[test]
fn tmpfs_full_mid_stream() {
    backend_fails_mid_stream(
        "2m",
        |_, _| {},
        |tmp, _| tmp.resize("256m"),
        &["space", "full", "enospc"],
    );
}

// ---------------------------------------------------------------------------------------
// split brain
// ---------------------------------------------------------------------------------------

/// A and B; v1 on both; A alone (degraded) writes v2; B alone must not come up read-write
/// (its table says A is optimal and A may hold newer writes); A and B together: B is stale,
/// the file reads v2; after recovery B holds v2.
#[test]
fn split_brain_sequence() {
    let fx = Fixture::new(2);
    let (a, b) = (fx.backends[0].clone(), fx.backends[1].clone());
    let v1 = b"version one\n".to_vec();
    let v2 = b"version two, written while B was away\n".repeat(100);

    let m = fx.mount();
    let (_, st) = status_json(&fx.mnt);
    assert_status_shape(&st);
    let (id_a, id_b) = (member_id(&st, &a), member_id(&st, &b));
    std::fs::write(m.path("f"), &v1).unwrap();
    m.unmount();

    // B missing: refused read-write without -o degraded, allowed with it.
    let line = assert_mount_refused(
        std::slice::from_ref(&a),
        &fx.mnt,
        &[],
        "A alone, read-write",
    );
    assert!(
        line.contains(&s(&canon(&b))) || line.to_lowercase().contains("missing"),
        "refusal should name the missing member: {line}"
    );
    let m = fx.mount_with(std::slice::from_ref(&a), &["-o", "degraded"]);
    let (c, st) = status_json(&fx.mnt);
    assert_eq!(c, 2, "A alone is degraded:\n{st:#}");
    assert!(
        ["missing", "degraded"].contains(&state_of(member_by_id(&st, id_b))),
        "B should be missing:\n{st:#}"
    );
    std::fs::write(m.path("f"), &v2).unwrap();
    std::fs::write(m.path("only-on-a"), b"A\n").unwrap();
    m.unmount();

    // B alone, read-write: B's table records A as optimal and A is missing. Refused, and
    // neither backend changes.
    let before = (snapshot(&a), snapshot(&b));
    let line = assert_mount_refused(
        std::slice::from_ref(&b),
        &fx.mnt,
        &[],
        "B alone after split",
    );
    let low = line.to_lowercase();
    assert!(
        line.contains(&s(&canon(&a)))
            || [
                format!("member {id_a}"),
                format!("member #{id_a}"),
                format!("id {id_a}")
            ]
            .iter()
            .any(|n| low.contains(n)),
        "refusal should name the missing member A ({}, id {id_a}): {line}",
        a.display()
    );
    assert_eq!(
        before,
        (snapshot(&a), snapshot(&b)),
        "refused mount changed a backend"
    );

    // B alone read-only is allowed and shows what B has: v1.
    let m = fx.mount_with(std::slice::from_ref(&b), &["-o", "ro"]);
    assert_eq!(
        std::fs::read(m.path("f")).unwrap(),
        v1,
        "B alone, read-only"
    );
    assert!(!m.path("only-on-a").exists());
    m.unmount();

    // Both: B is stale, A's data wins.
    let m = fx.mount();
    let (c, st) = status_json(&fx.mnt);
    assert_status_shape(&st);
    assert_eq!(c, 2, "B must start degraded:\n{st:#}");
    assert_eq!(state_of(member(&st, &a)), "optimal", "{st:#}");
    assert_eq!(state_of(member(&st, &b)), "degraded", "{st:#}");
    assert!(
        reason_of(member(&st, &b)).to_lowercase().contains("stale"),
        "B's reason should say stale:\n{st:#}"
    );
    let (c, t) = status(&fx.mnt);
    assert_eq!(c, 2, "{t}");
    assert!(t.to_lowercase().contains("stale"), "{t}");
    assert_eq!(std::fs::read(m.path("f")).unwrap(), v2, "read with B stale");
    assert_eq!(std::fs::read(m.path("only-on-a")).unwrap(), b"A\n");

    let out = run_for(&os(&[&"recover", &fx.mnt, &b, &"--wait"]), RECOVERY_TIMEOUT);
    assert_ok(&out, "recover B");
    assert_all_optimal(&fx.mnt, "after recovering B");
    assert_eq!(std::fs::read(m.path("f")).unwrap(), v2);
    let manifest = tree_manifest(&fx.mnt);
    m.unmount();

    let want: BTreeMap<String, Vec<u8>> = [
        ("f".to_string(), v2.clone()),
        ("only-on-a".to_string(), b"A\n".to_vec()),
    ]
    .into_iter()
    .collect();
    check_each_backend_alone(&[b.clone(), a.clone()], &fx.mnt, &manifest, &want);

    // Recovered, B alone is complete; both mount read-write again without -o degraded.
    let m = fx.mount();
    assert_all_optimal(&fx.mnt, "remount after recovery");
    m.unmount();
}

// ---------------------------------------------------------------------------------------
// disable and recover
// ---------------------------------------------------------------------------------------

/// Disable b1, change many files (overwrite, delete, create, rename files and a
/// directory), then recover b1 while a writer keeps writing.
#[test]
fn recovery_while_writing() {
    let fx = Fixture::new(2);
    let b1 = fx.backends[1].clone();
    let mut rng = StdRng::seed_from_u64(5);
    let mut want = BTreeMap::new();
    let m = fx.mount();
    write_files(&fx.mnt, "base", 200, 32 << 10, &mut rng, &mut want);
    write_files(&fx.mnt, "base/sub", 20, 8 << 10, &mut rng, &mut want);

    let out = run(&[&"disable", &fx.mnt, &b1]);
    assert_ok(&out, "disable b1");
    let (c, t) = status(&fx.mnt);
    assert_eq!(c, 2, "status after disable:\n{t}");
    assert!(t.contains("disabled by operator"), "{t}");
    let (c, st) = status_json(&fx.mnt);
    assert_eq!(c, 2);
    assert_status_shape(&st);
    assert_eq!(state_of(member(&st, &b1)), "degraded", "{st:#}");
    assert!(
        reason_of(member(&st, &b1)).contains("disabled by operator"),
        "{st:#}"
    );
    assert_eq!(st["state"], "degraded", "{st:#}");

    // Changes b1 misses.
    for i in (0..200).step_by(4) {
        let rel = format!("base/file-{i:04}");
        let len = rng.gen_range(0..=40_000);
        let data = random_bytes(&mut rng, len);
        std::fs::write(fx.mnt.join(&rel), &data).unwrap();
        want.insert(rel, data);
    }
    for i in (1..200).step_by(4) {
        let rel = format!("base/file-{i:04}");
        std::fs::remove_file(fx.mnt.join(&rel)).unwrap();
        want.remove(&rel);
    }
    for i in (2..200).step_by(8) {
        let (from, to) = (format!("base/file-{i:04}"), format!("base/renamed-{i:04}"));
        std::fs::rename(fx.mnt.join(&from), fx.mnt.join(&to)).unwrap();
        let data = want.remove(&from).unwrap();
        want.insert(to, data);
    }
    for i in (3..200).step_by(8) {
        let rel = format!("base/file-{i:04}");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(fx.mnt.join(&rel))
            .unwrap();
        f.set_len(1000).unwrap();
        close(f).unwrap();
        want.get_mut(&rel).unwrap().resize(1000, 0);
    }
    std::fs::rename(fx.mnt.join("base/sub"), fx.mnt.join("moved-sub")).unwrap();
    let moved: Vec<String> = want
        .keys()
        .filter(|k| k.starts_with("base/sub/"))
        .cloned()
        .collect();
    for k in moved {
        let data = want.remove(&k).unwrap();
        want.insert(k.replacen("base/sub/", "moved-sub/", 1), data);
    }
    write_files(&fx.mnt, "new", 50, 64 << 10, &mut rng, &mut want);

    // Recover while writing.
    let mut w = Writer::start(&fx.mnt, "live", 6, 16 << 10);
    w.wait_count(20, Duration::from_secs(60));
    let out = run_for(
        &os(&[&"recover", &fx.mnt, &b1, &"--wait"]),
        RECOVERY_TIMEOUT,
    );
    assert_ok(&out, "recover --wait b1 under writes");
    let after = w.count();
    w.wait_count(after + 20, Duration::from_secs(60));
    want.extend(w.finish());
    assert_all_optimal(&fx.mnt, "after recovery under writes");

    check_contents(&fx.mnt, &want, "through the mount");
    let manifest = tree_manifest(&fx.mnt);
    m.unmount();
    check_each_backend_alone(&fx.backends, &fx.mnt, &manifest, &want);
}

/// A recovery started without --wait and interrupted by an unmount goes on by itself at
/// the next mount.
#[test]
fn recovery_resumes_after_unmount() {
    let fx = Fixture::new(2);
    let b1 = fx.backends[1].clone();
    let mut rng = StdRng::seed_from_u64(6);
    let mut want = BTreeMap::new();
    let m = fx.mount();
    write_files(&fx.mnt, "before", 20, 64 << 10, &mut rng, &mut want);
    let (_, st) = status_json(&fx.mnt);
    let id = member_id(&st, &b1).to_string();

    // By member id this time.
    assert_ok(&run(&[&"disable", &fx.mnt, &id]), "disable b1 by id");
    let (c, st) = status_json(&fx.mnt);
    assert_eq!(c, 2, "{st:#}");
    assert_eq!(state_of(member(&st, &b1)), "degraded", "{st:#}");

    std::fs::create_dir(fx.mnt.join("missed")).unwrap();
    for i in 0..400 {
        let rel = format!("missed/f-{i:04}");
        let data = random_bytes(&mut rng, 64 << 10);
        std::fs::write(fx.mnt.join(&rel), &data).unwrap();
        want.insert(rel, data);
    }

    let started = Instant::now();
    assert_ok(&run(&[&"recover", &fx.mnt, &id]), "recover without --wait");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "recover without --wait should return at once, took {:?}",
        started.elapsed()
    );
    let (c, st) = status_json(&fx.mnt);
    let interrupted = state_of(member(&st, &b1)) == "recovering";
    assert!(
        [0, 1].contains(&c) && ["recovering", "optimal"].contains(&state_of(member(&st, &b1))),
        "after recover: {st:#}"
    );
    if interrupted {
        assert_eq!(c, 1, "status exits 1 while recovering:\n{st:#}");
        assert_eq!(st["state"], "recovering", "{st:#}");
        assert_progress(member(&st, &b1));
    } else {
        eprintln!("note: the recovery finished before the unmount; nothing to resume");
    }
    m.unmount();

    let m = fx.mount();
    let (c, st) = status_json(&fx.mnt);
    assert!(
        [0, 1].contains(&c),
        "after remount the recovery must go on by itself (exit 0 or 1), got {c}:\n{st:#}"
    );
    let b1_state = state_of(member(&st, &b1)).to_string();
    assert!(
        ["recovering", "optimal"].contains(&b1_state.as_str()),
        "b1 after remount: {st:#}"
    );
    if b1_state == "recovering" {
        assert_progress(member(&st, &b1));
    }
    wait_status(
        &fx.mnt,
        "resumed recovery",
        Duration::from_secs(120),
        |st| st["state"] == "optimal",
    );
    assert_all_optimal(&fx.mnt, "after resumed recovery");
    check_contents(&fx.mnt, &want, "through the mount");
    let manifest = tree_manifest(&fx.mnt);
    m.unmount();
    check_each_backend_alone(&fx.backends, &fx.mnt, &manifest, &want);
}

// ---------------------------------------------------------------------------------------
// replace
// ---------------------------------------------------------------------------------------

/// `replace MNT b1 NEW --wait`: NEW takes b1's member id and is filled online; afterwards
/// b0 and NEW mount read-write without b1, and NEW alone holds the whole tree.
#[test]
fn replace_with_new_empty_directory() {
    let fx = Fixture::new(2);
    let (b0, b1) = (fx.backends[0].clone(), fx.backends[1].clone());
    let new = fx.path("new");
    std::fs::create_dir(&new).unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let mut want = BTreeMap::new();

    let m = fx.mount();
    write_files(&fx.mnt, "data", 150, 64 << 10, &mut rng, &mut want);
    std::os::unix::fs::symlink("data/file-0001", fx.mnt.join("link")).unwrap();
    std::fs::hard_link(fx.mnt.join("data/file-0002"), fx.mnt.join("hard")).unwrap();
    want.insert("hard".into(), want["data/file-0002"].clone());
    let (_, st) = status_json(&fx.mnt);
    let id = member_id(&st, &b1);

    let out = run_for(
        &os(&[&"replace", &fx.mnt, &b1, &new, &"--wait"]),
        RECOVERY_TIMEOUT,
    );
    assert_ok(&out, "replace b1 by NEW");
    assert_all_optimal(&fx.mnt, "after replace");
    let (_, st) = status_json(&fx.mnt);
    assert_status_shape(&st);
    assert_eq!(members(&st).len(), 2, "{st:#}");
    assert_eq!(
        member_by_id(&st, id)["location"].as_str(),
        Some(s(&canon(&new)).as_str()),
        "member {id} should now be NEW:\n{st:#}"
    );
    let old = s(&canon(&b1));
    assert!(
        members(&st)
            .iter()
            .all(|m| m["location"].as_str() != Some(old.as_str())),
        "b1 still listed:\n{st:#}"
    );
    check_contents(&fx.mnt, &want, "after replace");
    let manifest = tree_manifest(&fx.mnt);
    m.unmount();

    // b0 and NEW, read-write, without b1 and without -o degraded.
    let pair = vec![b0.clone(), new.clone()];
    let m = fx.mount_with(&pair, &[]);
    assert_all_optimal(&fx.mnt, "b0 + NEW");
    assert_same("b0 + NEW", &manifest, &tree_manifest(&fx.mnt));
    write_files(&fx.mnt, "later", 10, 8 << 10, &mut rng, &mut want);
    check_contents(&fx.mnt, &want, "b0 + NEW");
    let manifest = tree_manifest(&fx.mnt);
    m.unmount();
    check_each_backend_alone(&[new.clone(), b0.clone()], &fx.mnt, &manifest, &want);
}

// ---------------------------------------------------------------------------------------
// quorum
// ---------------------------------------------------------------------------------------

#[track_caller]
fn assert_erofs<T: std::fmt::Debug>(res: std::io::Result<T>, what: &str) {
    match res {
        Err(e) if e.raw_os_error() == Some(EROFS) => {}
        other => panic!("{what}: expected EROFS (errno 30), got {other:?}"),
    }
}

/// Appends to an existing file; the first error of open, write or close.
fn append(p: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().append(true).open(p)?;
    f.write_all(data)?;
    close(f)
}

/// Below the quorum every kind of write fails with EROFS and reads go on; back at the
/// quorum, writes work again.
fn check_quorum(mnt: &Path, backends: &[PathBuf], extra: &[&str], gone: &Path, tag: &str) {
    let m = Mount::start(backends, mnt, extra);
    let (c, st) = status_json(mnt);
    assert_eq!(c, 0, "{tag}: {st:#}");
    assert_eq!(
        st["min_optimal"].as_u64(),
        Some(2),
        "{tag}: min_optimal:\n{st:#}"
    );
    let old = m.path(&format!("{tag}-old"));
    std::fs::write(&old, b"written with quorum\n").unwrap();
    std::fs::create_dir(m.path(&format!("{tag}-dir"))).unwrap();

    // Leaving one optimal backend is allowed even below the quorum.
    assert_ok(
        &run(&[&"disable", &mnt, &gone]),
        "disable down to one backend",
    );
    let (c, t) = status(mnt);
    assert_eq!(c, 2, "{tag}: below quorum:\n{t}");

    let what = |op: &str| format!("{tag}: {op} below quorum");
    assert_erofs(
        std::fs::write(m.path(&format!("{tag}-new")), b"x"),
        &what("create"),
    );
    assert_erofs(
        std::fs::create_dir(m.path(&format!("{tag}-d2"))),
        &what("mkdir"),
    );
    assert_erofs(append(&old, b"more\n"), &what("append"));
    assert_erofs(std::fs::remove_file(&old), &what("unlink"));
    assert_erofs(
        std::fs::rename(&old, m.path(&format!("{tag}-renamed"))),
        &what("rename"),
    );
    assert_erofs(
        std::fs::remove_dir(m.path(&format!("{tag}-dir"))),
        &what("rmdir"),
    );
    assert!(
        !m.path(&format!("{tag}-new")).exists(),
        "{tag}: refused create left a file"
    );
    assert_eq!(
        std::fs::read(&old).unwrap(),
        b"written with quorum\n",
        "{tag}: read below quorum"
    );

    let out = run_for(&os(&[&"recover", &mnt, &gone, &"--wait"]), RECOVERY_TIMEOUT);
    assert_ok(&out, "recover back to quorum");
    assert_all_optimal(mnt, tag);
    std::fs::write(m.path(&format!("{tag}-new")), b"x").unwrap();
    append(&old, b"more\n").unwrap();
    assert_eq!(std::fs::read(&old).unwrap(), b"written with quorum\nmore\n");
    m.unmount();
}

#[test]
fn quorum_refuses_writes() {
    let fx = Fixture::new(2);
    let (b0, b1) = (fx.backends[0].clone(), fx.backends[1].clone());
    check_quorum(&fx.mnt, &fx.backends, &["--min-optimal", "2"], &b1, "flag");
    check_quorum(
        &fx.mnt,
        &fx.backends,
        &["-o", "min_optimal=2"],
        &b0,
        "option",
    );

    let m = fx.mount();
    let manifest = tree_manifest(&fx.mnt);
    let want: BTreeMap<String, Vec<u8>> = [
        ("flag-old", b"written with quorum\nmore\n".to_vec()),
        ("option-old", b"written with quorum\nmore\n".to_vec()),
        ("flag-new", b"x".to_vec()),
        ("option-new", b"x".to_vec()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    check_contents(&fx.mnt, &want, "after both quorum rounds");
    m.unmount();
    check_each_backend_alone(&fx.backends, &fx.mnt, &manifest, &want);
}

// ---------------------------------------------------------------------------------------
// bad input
// ---------------------------------------------------------------------------------------

/// Each management command refuses bad input with one line and a non-zero exit, and
/// changes nothing.
#[test]
fn bad_input() {
    let fx = Fixture::new(2);
    let (b0, b1) = (fx.backends[0].clone(), fx.backends[1].clone());
    let mut rng = StdRng::seed_from_u64(9);
    let mut want = BTreeMap::new();
    let m = fx.mount();
    write_files(&fx.mnt, "d", 10, 4096, &mut rng, &mut want);
    assert_all_optimal(&fx.mnt, "fresh mount");

    // recover: optimal backend, unknown backend.
    assert_refused(
        &run(&[&"recover", &fx.mnt, &b0]),
        "recover of an optimal backend",
    );
    assert_refused(
        &run(&[&"recover", &fx.mnt, &b0, &"--wait"]),
        "recover --wait of an optimal backend",
    );
    assert_refused(
        &run(&[&"recover", &fx.mnt, &"/nonexistent"]),
        "recover /nonexistent",
    );
    assert_refused(
        &run(&[&"recover", &fx.mnt, &"99"]),
        "recover of unknown id 99",
    );
    let stray = fx.path("stray");
    std::fs::create_dir(&stray).unwrap();
    assert_refused(
        &run(&[&"recover", &fx.mnt, &stray]),
        "recover of a non-member dir",
    );
    assert_refused(
        &run(&[&"disable", &fx.mnt, &stray]),
        "disable of a non-member dir",
    );
    assert_refused(
        &run(&[&"disable", &fx.mnt, &"99"]),
        "disable of unknown id 99",
    );
    assert_all_optimal(&fx.mnt, "after refused recover/disable");

    // replace: NEW not empty, NEW a backend of another filesystem, OLD unknown.
    let full = fx.path("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("precious"), b"keep me\n").unwrap();
    let other = fx.path("other");
    std::fs::create_dir(&other).unwrap();
    init(std::slice::from_ref(&other));
    let empty = fx.path("empty");
    std::fs::create_dir(&empty).unwrap();
    let before = (snapshot(&full), snapshot(&other), snapshot(&empty));
    let backends_before = (snapshot(&b0), snapshot(&b1));
    assert_refused(
        &run(&[&"replace", &fx.mnt, &b1, &full, &"--wait"]),
        "replace with a non-empty NEW",
    );
    assert_refused(
        &run(&[&"replace", &fx.mnt, &b1, &other, &"--wait"]),
        "replace with a backend of another filesystem",
    );
    assert_refused(
        &run(&[&"replace", &fx.mnt, &"/nonexistent", &empty, &"--wait"]),
        "replace of an unknown OLD",
    );
    assert_refused(
        &run(&[&"replace", &fx.mnt, &b1, &fx.path("no-such-dir"), &"--wait"]),
        "replace with a NEW that does not exist",
    );
    assert_refused(
        &run(&[&"replace", &fx.mnt, &b1, &b0, &"--wait"]),
        "replace with a NEW that is a member",
    );
    assert_eq!(
        before,
        (snapshot(&full), snapshot(&other), snapshot(&empty)),
        "a refused replace changed a directory"
    );
    assert_eq!(
        backends_before,
        (snapshot(&b0), snapshot(&b1)),
        "a refused replace changed a backend"
    );
    assert!(!fx.path("no-such-dir").exists());
    assert_all_optimal(&fx.mnt, "after refused replaces");

    // status of things that are not mirrorfs mounts.
    let plain = fx.path("plain");
    std::fs::create_dir(&plain).unwrap();
    let missing = fx.path("does-not-exist");
    for (p, what) in [
        (plain.as_path(), "a plain directory"),
        (Path::new("/proc"), "another filesystem's mount"),
        (missing.as_path(), "a nonexistent path"),
    ] {
        for json in [false, true] {
            let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"status", &p];
            if json {
                args.push(&"--json");
            }
            let out = run(&args);
            let case = format!("status{} of {what}", if json { " --json" } else { "" });
            assert_refused(&out, &case);
            if p != missing {
                assert_eq!(code(&out), 3, "{case}: exit 3 expected:\n{}", text(&out));
            }
        }
    }
    assert!(!missing.exists());

    // disable: the last optimal backend.
    assert_ok(&run(&[&"disable", &fx.mnt, &b1]), "disable b1");
    assert_refused(
        &run(&[&"disable", &fx.mnt, &b0]),
        "disable of the last optimal backend",
    );
    let (c, st) = status_json(&fx.mnt);
    assert_eq!(c, 2, "{st:#}");
    assert_eq!(state_of(member(&st, &b0)), "optimal", "{st:#}");
    assert_eq!(state_of(member(&st, &b1)), "degraded", "{st:#}");
    check_contents(&fx.mnt, &want, "after refusals");
    std::fs::write(fx.mnt.join("still-writable"), b"yes\n").unwrap();
    want.insert("still-writable".into(), b"yes\n".to_vec());

    // Back to optimal; every backend holds the same tree.
    let out = run_for(
        &os(&[&"recover", &fx.mnt, &b1, &"--wait"]),
        RECOVERY_TIMEOUT,
    );
    assert_ok(&out, "recover b1");
    assert_all_optimal(&fx.mnt, "after recover");
    let manifest = tree_manifest(&fx.mnt);
    m.unmount();
    check_each_backend_alone(&fx.backends, &fx.mnt, &manifest, &want);
}
