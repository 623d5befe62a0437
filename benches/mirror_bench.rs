//! `make bench`: mirrorfs against the native filesystem, measured side by side in one run.
//!
//! Every figure is printed as a ratio against a baseline measured in the same run on the
//! same disk, because the machines this runs on are shared and noisy. Each case prints
//! `target` and whether the ratio met it; the run never fails on a missed target (speed is
//! reported, not asserted).
//!
//! Cases:
//! 1. sequential write of `MIRRORFS_BENCH_MIB` (default 1024) MiB in 1 MiB writes plus fsync
//!    through a 2-backend mirror, against writing the same bytes natively once per backend
//!    directory (plus fsync);
//! 2. sequential read of that file with caches dropped first, against a native read;
//! 3. create + write 4 KiB + close of 10,000 files, then their removal, against native doing
//!    the same in each backend directory;
//! 4. broadcast parallelism: 3 backends that each take 5 ms per write against 1 such backend
//!    (in process, through the mirror layer and the fault-injecting store);
//! 5. peak resident memory of the mount process during the write of case 1;
//! 6. full recovery (`replace`) of a backend holding the file set against `cp -a` of the same
//!    backend directory; recovery after an outage in which 1% of the files changed (bytes
//!    copied against the total); write throughput while a full recovery runs, against
//!    without;
//! 7. the cost of checksums: sequential write and cold read through a mirror whose objects
//!    carry checksums, against the same build on a mirror formatted without them (best of
//!    two runs each, alternating);
//! 8. scrub of that mirror (caches dropped) against reading the same bytes of both backend
//!    directories natively.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mirrorfs::mirror::{format, format_with, Mirror, MirrorOptions, Mutation};
use mirrorfs::store::{FaultKind, FaultStore, LocalStore, Op, Store};

const MIB: usize = 1 << 20;

fn main() {
    // `cargo bench` passes `--bench`; any other argument is a filter on case names.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let wanted = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let mib: usize = std::env::var("MIRRORFS_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let files: usize = std::env::var("MIRRORFS_BENCH_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);

    let base = std::env::var_os("MIRRORFS_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("mirrorfs-bench-")
        .tempdir_in(base)
        .expect("tempdir");
    println!(
        "mirrorfs benchmark in {} ({} MiB file, {} small files)",
        dir.path().display(),
        mib,
        files
    );
    println!(
        "{:<44} {:>12} {:>12} {:>8} {:>8}",
        "case", "native", "mirrorfs", "ratio", "target"
    );

    if wanted("seq") {
        sequential(dir.path(), mib);
    }
    if wanted("small") {
        small_files(dir.path(), files);
    }
    if wanted("parallel") {
        parallel_broadcast(dir.path());
    }
    if wanted("recovery") {
        recovery(dir.path(), mib);
    }
    if wanted("integrity") {
        integrity(dir.path(), mib);
    }
}

/// Prints one result line; `lower_is_better` figures are times, the ratio is mirrorfs/native.
fn report(case: &str, native: f64, mirror: f64, unit: &str, target: f64) {
    let ratio = mirror / native;
    let verdict = if ratio <= target { "met" } else { "MISSED" };
    println!(
        "{case:<44} {:>10.2}{unit} {:>10.2}{unit} {ratio:>7.2}x {:>6.1}x {verdict}",
        native, mirror, target
    );
}

fn drop_caches() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    if fs::write("/proc/sys/vm/drop_caches", "3\n").is_err() {
        println!("  (could not drop caches: not root? read figures include the page cache)");
    }
}

fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e3779b97f4a7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write_file(path: &Path, mib: usize, chunk: &[u8]) -> Duration {
    let start = Instant::now();
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    for _ in 0..mib {
        f.write_all(chunk).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    start.elapsed()
}

fn read_file(path: &Path) -> (Duration, usize) {
    let start = Instant::now();
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(0)
        .open(path)
        .unwrap();
    let mut buf = vec![0u8; MIB];
    let mut total = 0;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n;
    }
    (start.elapsed(), total)
}

/// A live mount owned by the benchmark; unmounted on drop.
struct Mounted {
    mnt: PathBuf,
    child: Option<Child>,
}

impl Mounted {
    fn start(backends: &[PathBuf], mnt: &Path) -> Mounted {
        let child = Command::new(env!("CARGO_BIN_EXE_mirrorfs"))
            .arg("mount")
            .arg("-f")
            .args(backends)
            .arg(mnt)
            .env("MIRRORFS_LOG", "warn,fuser=error")
            .stdin(Stdio::null())
            .spawn()
            .expect("start mirrorfs");
        let m = Mounted {
            mnt: mnt.to_path_buf(),
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(mnt) {
            assert!(Instant::now() < deadline, "mount did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        m
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        for _ in 0..50 {
            let mut cmd = Command::new("fusermount3");
            cmd.arg("-u").arg(&self.mnt).stderr(Stdio::null());
            if cmd.status().map(|s| s.success()).unwrap_or(false) || !is_mounted(&self.mnt) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

fn is_mounted(path: &Path) -> bool {
    let want = path.to_string_lossy().into_owned();
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

fn mirror_dirs(root: &Path, name: &str, n: usize) -> (Vec<PathBuf>, PathBuf) {
    let backends: Vec<PathBuf> = (0..n).map(|i| root.join(format!("{name}-b{i}"))).collect();
    for b in &backends {
        fs::create_dir_all(b).unwrap();
    }
    let status = Command::new(env!("CARGO_BIN_EXE_mirrorfs"))
        .arg("init")
        .args(&backends)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "init failed");
    let mnt = root.join(format!("{name}-mnt"));
    fs::create_dir_all(&mnt).unwrap();
    (backends, mnt)
}

/// Peak resident set of a process, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn sequential(root: &Path, mib: usize) {
    let chunk = pattern(MIB);
    let native_dirs: Vec<PathBuf> = (0..2).map(|i| root.join(format!("native-{i}"))).collect();
    for d in &native_dirs {
        fs::create_dir_all(d).unwrap();
    }
    let (backends, mnt) = mirror_dirs(root, "seq", 2);
    let mount = Mounted::start(&backends, &mnt);

    drop_caches();
    let native_write: Duration = native_dirs
        .iter()
        .map(|d| write_file(&d.join("big"), mib, &chunk))
        .sum();
    drop_caches();
    let mirror_write = write_file(&mnt.join("big"), mib, &chunk);
    let rss = peak_rss_kib(mount.pid());

    drop_caches();
    let (native_read, n1) = read_file(&native_dirs[0].join("big"));
    drop_caches();
    let (mirror_read, n2) = read_file(&mnt.join("big"));
    assert_eq!((n1, n2), (mib * MIB, mib * MIB));

    let secs = |d: Duration| d.as_secs_f64();
    report(
        &format!("seq write {mib} MiB + fsync (native x2)"),
        secs(native_write),
        secs(mirror_write),
        "s",
        1.3,
    );
    report(
        &format!("seq read {mib} MiB, cold"),
        secs(native_read),
        secs(mirror_read),
        "s",
        1.3,
    );
    let mbps = |d: Duration| mib as f64 / d.as_secs_f64();
    println!(
        "  throughput: write native {:.0} MiB/s (both copies), mirror {:.0} MiB/s; \
         read native {:.0} MiB/s, mirror {:.0} MiB/s",
        mbps(native_write),
        mbps(mirror_write),
        mbps(native_read),
        mbps(mirror_read)
    );
    match rss {
        Some(kib) => {
            let verdict = if kib <= 200 * 1024 { "met" } else { "MISSED" };
            println!(
                "{:<44} {:>24.1} MiB {:>15} {verdict}",
                "peak RSS of the mount during the write",
                kib as f64 / 1024.0,
                "200 MiB"
            );
        }
        None => println!("peak RSS: could not read /proc/{}/status", mount.pid()),
    }
    drop(mount);
    for d in native_dirs {
        let _ = fs::remove_dir_all(d);
    }
    for b in backends {
        let _ = fs::remove_dir_all(b);
    }
}

fn create_files(dir: &Path, n: usize, data: &[u8]) -> Duration {
    let start = Instant::now();
    for i in 0..n {
        let mut f = File::create(dir.join(format!("f{i:05}"))).unwrap();
        f.write_all(data).unwrap();
    }
    start.elapsed()
}

fn remove_files(dir: &Path, n: usize) -> Duration {
    let start = Instant::now();
    for i in 0..n {
        fs::remove_file(dir.join(format!("f{i:05}"))).unwrap();
    }
    start.elapsed()
}

fn small_files(root: &Path, n: usize) {
    let data = pattern(4096);
    let native_dirs: Vec<PathBuf> = (0..2)
        .map(|i| root.join(format!("small-native-{i}")))
        .collect();
    for d in &native_dirs {
        fs::create_dir_all(d).unwrap();
    }
    let (backends, mnt) = mirror_dirs(root, "small", 2);
    let mount = Mounted::start(&backends, &mnt);
    let target = mnt.join("files");
    fs::create_dir(&target).unwrap();

    let native_create: Duration = native_dirs.iter().map(|d| create_files(d, n, &data)).sum();
    let mirror_create = create_files(&target, n, &data);
    let native_remove: Duration = native_dirs.iter().map(|d| remove_files(d, n)).sum();
    let mirror_remove = remove_files(&target, n);

    let secs = |d: Duration| d.as_secs_f64();
    report(
        &format!("create+write 4 KiB+close x{n} (native x2)"),
        secs(native_create),
        secs(mirror_create),
        "s",
        3.0,
    );
    report(
        &format!("remove x{n} (native x2)"),
        secs(native_remove),
        secs(mirror_remove),
        "s",
        3.0,
    );
    let total_native = secs(native_create + native_remove);
    let total_mirror = secs(mirror_create + mirror_remove);
    report(
        "small files, create + remove together",
        total_native,
        total_mirror,
        "s",
        3.0,
    );
    drop(mount);
    for d in native_dirs.into_iter().chain(backends) {
        let _ = fs::remove_dir_all(d);
    }
}

/// Writes through the mirror layer to `n` local backends that each stall 5 ms per write.
fn broadcast_time(root: &Path, n: usize, writes: usize) -> Duration {
    let faults: Vec<Arc<FaultStore>> = (0..n)
        .map(|i| {
            let dir = root.join(format!("par{n}-{i}"));
            fs::create_dir_all(&dir).unwrap();
            let local: Arc<dyn Store> = Arc::new(LocalStore::open(&dir).unwrap());
            Arc::new(FaultStore::new(local))
        })
        .collect();
    let stores: Vec<(String, Arc<dyn Store>)> = faults
        .iter()
        .map(|f| (f.describe(), Arc::clone(f) as Arc<dyn Store>))
        .collect();
    format(&stores, &vec![]).unwrap();
    let mirror = Mirror::open(stores, MirrorOptions::default()).unwrap();
    for f in &faults {
        f.fault_always(
            Some(Op::WriteAt),
            FaultKind::Stall(Duration::from_millis(5)),
        );
    }
    let data: Arc<[u8]> = pattern(4096).into();
    let start = Instant::now();
    // 4 KiB writes into one block: the store's own cost stays small, so the figure is the
    // broadcast's (5 ms per backend, in parallel or not).
    let key = "b/00/0000000000000100.00000000".to_string();
    for i in 0..writes {
        let m = Mutation::WriteAt {
            key: key.clone(),
            offset: (i % 256) as u64 * 4096,
            data: Arc::clone(&data),
        };
        mirror.apply(vec![m]).unwrap();
    }
    start.elapsed()
}

fn parallel_broadcast(root: &Path) {
    let writes = 200;
    let one = broadcast_time(root, 1, writes);
    let three = broadcast_time(root, 3, writes);
    report(
        &format!("{writes} writes, 5 ms/backend: 3 backends vs 1"),
        one.as_secs_f64(),
        three.as_secs_f64(),
        "s",
        1.2,
    );
}

fn cli(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mirrorfs"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn du_bytes(dir: &Path) -> u64 {
    let out = Command::new("du").arg("-sb").arg(dir).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn last_recovery_bytes(mnt: &Path, member: u64) -> Option<u64> {
    let out = cli(&["status".as_ref(), mnt.as_os_str(), "--json".as_ref()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let b = v["backends"]
        .as_array()?
        .iter()
        .find(|b| b["id"].as_u64() == Some(member))?
        .clone();
    b["last_recovery"]["bytes"].as_u64()
}

fn timed_cli(args: &[&std::ffi::OsStr]) -> Duration {
    let start = Instant::now();
    let out = cli(args);
    assert!(
        out.status.success(),
        "{:?}: {}",
        args,
        String::from_utf8_lossy(&out.stderr)
    );
    start.elapsed()
}

fn recovery(root: &Path, mib: usize) {
    let file_mib = 8;
    let files = (mib / file_mib).max(4);
    let chunk = pattern(MIB);
    let (backends, mnt) = mirror_dirs(root, "rec", 2);
    let mount = Mounted::start(&backends, &mnt);
    for i in 0..files {
        write_file(&mnt.join(format!("f{i:04}")), file_mib, &chunk);
    }

    drop_caches();
    let copy = root.join("rec-cp");
    let start = Instant::now();
    let status = Command::new("cp")
        .arg("-a")
        .arg(&backends[1])
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    // SAFETY: sync has no preconditions; cp's data must reach the disk as recovery's does.
    unsafe { libc::sync() };
    let cp_time = start.elapsed();
    let _ = fs::remove_dir_all(&copy);

    drop_caches();
    let fresh = root.join("rec-new");
    fs::create_dir(&fresh).unwrap();
    let replace = timed_cli(&[
        "replace".as_ref(),
        mnt.as_os_str(),
        backends[1].as_os_str(),
        fresh.as_os_str(),
        "--wait".as_ref(),
    ]);
    let total = files * file_mib;
    report(
        &format!("full recovery of {total} MiB vs cp -a"),
        cp_time.as_secs_f64(),
        replace.as_secs_f64(),
        "s",
        1.5,
    );

    // A short outage in which 1% of the files change.
    let out = cli(&["disable".as_ref(), mnt.as_os_str(), fresh.as_os_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let changed = (files / 100).max(1);
    for i in 0..changed {
        write_file(
            &mnt.join(format!("f{:04}", i * 100 % files)),
            file_mib,
            &chunk,
        );
    }
    timed_cli(&[
        "recover".as_ref(),
        mnt.as_os_str(),
        fresh.as_os_str(),
        "--wait".as_ref(),
    ]);
    let copied = last_recovery_bytes(&mnt, 1).unwrap_or(0);
    let backend_bytes = du_bytes(&backends[0]);
    let case = format!("recovery after {changed} of {files} files changed");
    let pct = 100.0 * copied as f64 / backend_bytes.max(1) as f64;
    let (copied_mib, total_mib) = (
        copied as f64 / MIB as f64,
        backend_bytes as f64 / MIB as f64,
    );
    println!("{case:<44} {copied_mib:>8.1} MiB of {total_mib:.1} MiB copied ({pct:.2}%)");

    // Write throughput while a full recovery runs.
    let probe_mib = (mib / 4).max(16);
    let quiet = write_file(&mnt.join("probe-quiet"), probe_mib, &chunk);
    let again = root.join("rec-again");
    fs::create_dir(&again).unwrap();
    let out = cli(&[
        "replace".as_ref(),
        mnt.as_os_str(),
        fresh.as_os_str(),
        again.as_os_str(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let busy = write_file(&mnt.join("probe-busy"), probe_mib, &chunk);
    let recovering_at_end = cli(&["status".as_ref(), mnt.as_os_str()]).status.code() == Some(1);
    let deadline = Instant::now() + Duration::from_secs(1800);
    while cli(&["status".as_ref(), mnt.as_os_str()]).status.code() != Some(0) {
        assert!(Instant::now() < deadline, "recovery did not finish");
        std::thread::sleep(Duration::from_millis(200));
    }
    let rate = |d: Duration| probe_mib as f64 / d.as_secs_f64();
    println!(
        "{:<44} {:>9.0} MiB/s {:>9.0} MiB/s {:>7.2}x{}",
        format!("write {probe_mib} MiB: idle vs during recovery"),
        rate(quiet),
        rate(busy),
        quiet.as_secs_f64() / busy.as_secs_f64(),
        if recovering_at_end {
            ""
        } else {
            "  (recovery ended before the write did)"
        }
    );
    drop(mount);
    for d in backends.iter().chain([&fresh, &again]) {
        let _ = fs::remove_dir_all(d);
    }
}

/// Two backends formatted through the library, with or without checksums.
fn mirror_dirs_checksums(root: &Path, name: &str, checksums: bool) -> (Vec<PathBuf>, PathBuf) {
    let backends: Vec<PathBuf> = (0..2).map(|i| root.join(format!("{name}-b{i}"))).collect();
    let mut stores: Vec<(String, Arc<dyn Store>)> = Vec::new();
    for b in &backends {
        fs::create_dir_all(b).unwrap();
        let s = LocalStore::open(b).unwrap();
        stores.push((s.describe(), Arc::new(s)));
    }
    // SAFETY: getuid/getgid have no preconditions and cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    format_with(&stores, &mirrorfs::fs::Fs::root_batch(uid, gid), checksums).unwrap();
    let mnt = root.join(format!("{name}-mnt"));
    fs::create_dir_all(&mnt).unwrap();
    (backends, mnt)
}

fn read_tree(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            total += read_tree(&path);
        } else {
            total += read_file(&path).1 as u64;
        }
    }
    total
}

fn integrity(root: &Path, mib: usize) {
    let chunk = pattern(MIB);
    let with = mirror_dirs_checksums(root, "sum", true);
    let without = mirror_dirs_checksums(root, "nosum", false);
    let mut best = [[f64::MAX; 2]; 2];
    for round in 0..2 {
        for (i, (backends, mnt)) in [&with, &without].into_iter().enumerate() {
            let mount = Mounted::start(backends, mnt);
            let _ = fs::remove_file(mnt.join("big"));
            drop_caches();
            let w = write_file(&mnt.join("big"), mib, &chunk).as_secs_f64();
            drop_caches();
            let (r, n) = read_file(&mnt.join("big"));
            assert_eq!(n, mib * MIB);
            best[i][0] = best[i][0].min(w);
            best[i][1] = best[i][1].min(r.as_secs_f64());
            drop(mount);
            if round == 1 && i == 1 {
                let _ = fs::remove_dir_all(mnt);
            }
        }
    }
    report(
        &format!("seq write {mib} MiB, checksums off | on"),
        best[1][0],
        best[0][0],
        "s",
        1.1,
    );
    report(
        &format!("seq read {mib} MiB cold, checksums off | on"),
        best[1][1],
        best[0][1],
        "s",
        1.1,
    );

    // Scrub reads every copy: compare with reading both backend directories natively.
    let (backends, mnt) = &with;
    let mount = Mounted::start(backends, mnt);
    drop_caches();
    let start = Instant::now();
    let bytes: u64 = backends.iter().map(|b| read_tree(b)).sum();
    let native = start.elapsed().as_secs_f64();
    drop_caches();
    let start = Instant::now();
    let out = cli(&["scrub".as_ref(), mnt.as_os_str(), "--wait".as_ref()]);
    let scrub = start.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "scrub failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ratio = scrub / native;
    println!(
        "{:<44} {:>10.2}s {:>10.2}s {ratio:>7.2}x  (scrub {:.0} MiB/s, native read {:.0} MiB/s)",
        "scrub of 2 copies vs native read of both",
        native,
        scrub,
        bytes as f64 / MIB as f64 / scrub,
        bytes as f64 / MIB as f64 / native
    );
    drop(mount);
    for (backends, _) in [with, without] {
        for b in backends {
            let _ = fs::remove_dir_all(b);
        }
    }
}
