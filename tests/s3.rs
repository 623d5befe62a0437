//! S3 backends, end to end, against a real single-node Garage server started per test
//! (see `common::garage`; `.ci/install-deps` installs `garage`).
//!
//! - `s3_tools_on_local_and_bucket_mirror`: `cp -a`, `sha256sum`, `tar`, `rsync` and `git`
//!   on a mirror of a local directory and a bucket prefix; then a remount, and each backend
//!   mounted alone `-o ro` shows the same tree.
//! - `s3_differential_against_native`: seeded random file operations applied to a native
//!   directory and to the mount, results compared step by step and trees compared often.
//! - `s3_outage_degrades_then_recover_catches_up`: the server is killed in the middle of a
//!   stream of writes; the bucket backend is degraded (status exit 2, with the reason) and
//!   writes go on; after a restart, `recover --wait` makes the bucket equal to the local
//!   backend (compared by mounting each alone `-o ro`).
//! - `s3_bad_credentials_missing_bucket_and_dead_server`: wrong credentials, a missing
//!   bucket and an unreachable endpoint at `init` and at `mount`: one line, non-zero exit,
//!   nothing changed. Also credentials from an AWS profile file, and a non-empty prefix.
//! - `s3_checksums_scrub_fsck_and_crash`: a damaged local copy is read around and repaired
//!   from the bucket; scrub and fsck over a local + bucket mirror; the mount process killed
//!   while writing in small pieces (held in memory for the bucket) is repaired at the next
//!   mount, and the bucket then holds exactly what the local backend holds.
//! - `s3_lease_keeps_a_second_mount_out`: while a mount holds a prefix's lease, a second
//!   mount (read-write or read-only) and fsck are refused; a killed mount's lease, and a
//!   stale one of another machine, are taken over; a live foreign one refuses the mount; a
//!   lease taken over under a live mount degrades the bucket there.

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::garage::{mount_env, Garage};
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

// ---------------------------------------------------------------------------------------
// helpers
// ---------------------------------------------------------------------------------------

/// Runs `mirrorfs ARGS` with `envs`, killing it after `timeout`.
fn run_env(args: &[&str], envs: &[(String, String)], timeout: Duration) -> Output {
    run_timed(
        Command::new(bin())
            .args(args)
            .envs(envs.iter().map(|(k, v)| (k, v))),
        timeout,
    )
}

/// Asserts a refusal with exactly one line `mirrorfs: ...` on stderr; returns the line.
#[track_caller]
fn assert_refused(out: &Output, what: &str) -> String {
    assert!(
        !out.status.success(),
        "{what}: expected a refusal:\n{}",
        text(out)
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: stderr must be one line, got:\n{err}"
    );
    assert!(lines[0].starts_with("mirrorfs: "), "{what}: {err}");
    lines[0].to_string()
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// What a copy must preserve: type, mode, size of files, symlink targets, contents.
fn manifest(root: &Path) -> String {
    sh(&format!(
        "cd {} && find . -mindepth 1 \\( -type d -printf '%P %y %m\\n' \\) -o \
         \\( -type f -printf '%P %y %m %s %n\\n' \\) -o -printf '%P %y -> %l\\n' | sort && \
         find . -type f -print0 | sort -z | xargs -0 -r sha256sum",
        q(root)
    ))
}

/// A deterministic tree: small and block-sized files, sparse and unaligned sizes,
/// directories, symlinks and a hard link.
fn make_tree(root: &Path, seed: u64, files: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    fs::create_dir_all(root).unwrap();
    for i in 0..files {
        let dir = root.join(format!("d{}/e{}", i % 7, i % 3));
        fs::create_dir_all(&dir).unwrap();
        let size = match i % 10 {
            0 => 0,
            1 => (1 << 20) + rng.gen_range(0..5000),
            2 => 3 * (1 << 20) - 17,
            _ => rng.gen_range(1..40_000),
        };
        let data: Vec<u8> = (0..size).map(|_| rng.gen()).collect();
        let p = dir.join(format!("f{i}.bin"));
        fs::write(&p, &data).unwrap();
        fs::set_permissions(
            &p,
            fs::Permissions::from_mode(0o600 + (i as u32 % 3) * 0o44),
        )
        .unwrap();
    }
    // A sparse file with a hole across a block boundary.
    let f = File::create(root.join("sparse")).unwrap();
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(b"tail", (5 << 20) + 3).unwrap();
    std::os::unix::fs::symlink("d0/e0/f0.bin", root.join("link")).unwrap();
    std::os::unix::fs::symlink("nowhere", root.join("dangling")).unwrap();
    fs::hard_link(root.join("d1/e1/f1.bin"), root.join("hard")).unwrap();
}

/// A fixture with one local backend (`b0`) and one bucket prefix, formatted together.
struct Pair {
    fx: Fixture,
    garage: Garage,
    url: String,
}

impl Pair {
    fn new(prefix: &str) -> Pair {
        let garage = Garage::start_new();
        let fx = Fixture::unformatted(1);
        let url = garage.url(prefix);
        let out = run_env(
            &["init", &s(&fx.backends[0]), &url],
            &garage.envs(),
            Duration::from_secs(60),
        );
        assert_ok(&out, "init local + bucket");
        Pair { fx, garage, url }
    }

    fn backends(&self) -> Vec<String> {
        vec![s(&self.fx.backends[0]), self.url.clone()]
    }

    fn mount(&self, extra: &[&str]) -> Mount {
        mount_env(&self.backends(), &self.fx.mnt, extra, &self.garage.envs())
    }

    fn mount_alone_ro(&self, backend: &str) -> Mount {
        mount_env(
            &[backend.to_string()],
            &self.fx.mnt,
            &["-o", "ro"],
            &self.garage.envs(),
        )
    }

    fn mirrorfs(&self, args: &[&str]) -> Output {
        run_env(args, &self.garage.envs(), Duration::from_secs(240))
    }
}

// ---------------------------------------------------------------------------------------
// (a) real tools
// ---------------------------------------------------------------------------------------

#[test]
fn s3_tools_on_local_and_bucket_mirror() {
    let p = Pair::new("tools/m");
    let src = p.fx.path("src");
    make_tree(&src, 7, 120);
    let want = manifest(&src);

    let mnt = p.fx.mnt.clone();
    let m = p.mount(&[]);
    let t = Instant::now();
    let lap = |what: &str| eprintln!("{what}: {:.1?}", t.elapsed());
    sh(&format!("cp -a {}/. {}/copy", q(&src), q(&mnt)));
    lap("cp -a");
    assert_same("cp -a", &want, &manifest(&mnt.join("copy")));
    let sums = sh(&format!(
        "cd {} && find . -type f -print0 | sort -z | xargs -0 sha256sum",
        q(&src)
    ));
    let sums_file = p.fx.path("sums");
    fs::write(&sums_file, &sums).unwrap();
    sh(&format!(
        "cd {}/copy && sha256sum --quiet -c {}",
        q(&mnt),
        q(&sums_file)
    ));

    // tar round trip: out of the mount, back into it, with tar's default 10 KiB records:
    // the bucket gets each block once, at close (write buffering), not once per record.
    let tarball = p.fx.path("t.tar");
    sh(&format!("tar -C {}/copy -cf {} .", q(&mnt), q(&tarball)));
    sh(&format!(
        "mkdir {0}/untar && tar -C {0}/untar -xpf {1}",
        q(&mnt),
        q(&tarball)
    ));
    assert_same("tar", &want, &manifest(&mnt.join("untar")));
    lap("tar");

    // rsync in, change some files, rsync again (delta transfer into existing files).
    sh(&format!("rsync -aH {}/ {}/rsync/", q(&src), q(&mnt)));
    assert_same("rsync", &want, &manifest(&mnt.join("rsync")));
    sh(&format!(
        "printf 'changed' >> {0}/d2/e2/f2.bin && rm {0}/d3/e0/f3.bin",
        q(&src)
    ));
    sh(&format!(
        "rsync -aH --delete --no-whole-file {}/ {}/rsync/",
        q(&src),
        q(&mnt)
    ));
    let want = manifest(&src);
    assert_same("rsync again", &want, &manifest(&mnt.join("rsync")));
    lap("rsync");

    // A small git repository: commits, a branch, gc (repacks, renames, deletes).
    let repo = mnt.join("repo");
    sh(&format!(
        "set -e; git init -q {r}; cd {r}; git config user.email t@e; git config user.name t; \
         for i in 1 2 3 4 5; do echo line $i >> file; cp -r {src}/d4 d4-$i; git add -A; \
         git commit -qm c$i; done; git checkout -qb side; echo x > side; git add side; \
         git commit -qm side; git checkout -q -; git merge -q --no-ff --no-edit side; git gc -q; \
         git fsck --full",
        r = q(&repo),
        src = q(&src)
    ));
    let log = sh(&format!("cd {} && git log --oneline | wc -l", q(&repo)));
    assert_eq!(log.trim(), "7", "git log");
    lap("git");
    let whole = manifest(&mnt);
    m.unmount();
    lap("unmount");

    let m = p.mount(&[]);
    assert_same("after remount", &whole, &manifest(&mnt));
    sh(&format!(
        "cd {} && git status --porcelain && git fsck --no-progress",
        q(&repo)
    ));
    m.unmount();

    for b in p.backends() {
        let m = p.mount_alone_ro(&b);
        assert_same(&format!("{b} alone, read-only"), &whole, &manifest(&mnt));
        m.unmount();
    }
}

// ---------------------------------------------------------------------------------------
// (b) differential
// ---------------------------------------------------------------------------------------

const NAMES: [&str; 4] = ["a", "b", "dir", "dir/c"];

/// One operation's outcome on one tree: a value or an errno.
type Outcome = Result<String, i32>;

fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

fn pick(rng: &mut StdRng) -> String {
    let base = NAMES[rng.gen_range(0..NAMES.len())];
    if rng.gen_bool(0.3) {
        format!("dir/d2/{}", NAMES[rng.gen_range(0..2)])
    } else {
        base.to_string()
    }
}

/// Applies the operation chosen by `seed` under `root`; the same seed gives the same
/// operation on every tree.
fn apply_op(root: &Path, seed: u64) -> (String, Outcome) {
    let mut rng = StdRng::seed_from_u64(seed);
    let p = pick(&mut rng);
    let q_ = pick(&mut rng);
    let path = root.join(&p);
    let other = root.join(&q_);
    const BLOCK: u64 = 1 << 20;
    let offsets = [
        0,
        1,
        4095,
        4096,
        BLOCK - 3,
        BLOCK,
        BLOCK + 777,
        3 * BLOCK - 1,
    ];
    let kind = rng.gen_range(0..13);
    let (desc, out): (String, Outcome) = match kind {
        0..=2 => {
            let off = offsets[rng.gen_range(0..offsets.len())] + rng.gen_range(0..3);
            let len = [1usize, 100, 4096, 70_000, BLOCK as usize + 5][rng.gen_range(0..5)];
            let fill = rng.gen::<u8>();
            let data: Vec<u8> = (0..len).map(|i| fill.wrapping_add(i as u8)).collect();
            let r = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .and_then(|f| f.write_all_at(&data, off).map(|_| f))
                .and_then(|f| {
                    if rng.gen_bool(0.2) {
                        f.sync_all()
                    } else {
                        Ok(())
                    }
                });
            (
                format!("write {p} @{off} +{len}"),
                r.map(|_| String::new()).map_err(errno),
            )
        }
        3 => {
            let len = offsets[rng.gen_range(0..offsets.len())] + rng.gen_range(0..2);
            let r = OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(len));
            (
                format!("truncate {p} {len}"),
                r.map(|_| String::new()).map_err(errno),
            )
        }
        4 => {
            let r = OpenOptions::new()
                .append(true)
                .create(true)
                .open(&path)
                .and_then(|mut f| f.write_all(b"appended\n"));
            (
                format!("append {p}"),
                r.map(|_| String::new()).map_err(errno),
            )
        }
        5 | 6 => {
            let off = offsets[rng.gen_range(0..offsets.len())];
            let len = rng.gen_range(1..200_000);
            let r = File::open(&path).and_then(|f| {
                let mut buf = vec![0u8; len];
                let mut done = 0;
                loop {
                    let n = f.read_at(&mut buf[done..], off + done as u64)?;
                    if n == 0 || done + n == len {
                        done += n;
                        break;
                    }
                    done += n;
                }
                buf.truncate(done);
                Ok(buf)
            });
            let shown = r.map(|b| format!("{} bytes, hash {}", b.len(), fnv(&b)));
            (format!("read {p} @{off} +{len}"), shown.map_err(errno))
        }
        7 => (
            format!("rename {p} {q_}"),
            fs::rename(&path, &other)
                .map(|_| String::new())
                .map_err(errno),
        ),
        8 => {
            let r = if rng.gen_bool(0.5) {
                fs::create_dir(&path)
            } else {
                fs::remove_dir(&path)
            };
            (
                format!("mkdir/rmdir {p}"),
                r.map(|_| String::new()).map_err(errno),
            )
        }
        9 => (
            format!("unlink {p}"),
            fs::remove_file(&path).map(|_| String::new()).map_err(errno),
        ),
        10 => {
            let r = if rng.gen_bool(0.5) {
                std::os::unix::fs::symlink(&q_, &path).map(|_| String::new())
            } else {
                fs::read_link(&path).map(|t| s(&t))
            };
            (format!("symlink/readlink {p} {q_}"), r.map_err(errno))
        }
        11 => {
            let mode = [0o600, 0o644, 0o755, 0o640][rng.gen_range(0..4)];
            let r = fs::set_permissions(&path, fs::Permissions::from_mode(mode));
            (
                format!("chmod {p} {mode:o}"),
                r.map(|_| String::new()).map_err(errno),
            )
        }
        _ => {
            let r = fs::symlink_metadata(&path).map(|m| {
                let size = if m.is_dir() { 0 } else { m.len() };
                format!(
                    "{:?} mode {:o} size {size} nlink {}",
                    m.file_type(),
                    m.mode(),
                    if m.is_dir() { 0 } else { m.nlink() }
                )
            });
            (format!("stat {p}"), r.map_err(errno))
        }
    };
    (desc, out)
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, &x| {
        (h ^ x as u64).wrapping_mul(0x100000001b3)
    })
}

#[test]
fn s3_differential_against_native() {
    let seeds: Vec<u64> = match std::env::var("MIRRORFS_S3_DIFF_SEED") {
        Ok(v) => vec![v.parse().expect("MIRRORFS_S3_DIFF_SEED is a number")],
        Err(_) => vec![42, 7, 2024],
    };
    let ops: usize = std::env::var("MIRRORFS_S3_DIFF_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let garage = Garage::start_new();
    for seed in seeds {
        differential_run(&garage, seed, ops);
    }
}

/// One seeded run on a fresh local + bucket mirror; reproduce with
/// `MIRRORFS_S3_DIFF_SEED=seed MIRRORFS_S3_DIFF_OPS=ops`.
fn differential_run(garage: &Garage, seed: u64, ops: usize) {
    // Options in the URL this time: no AWS environment needed.
    let fx = Fixture::unformatted(1);
    let url = garage.url_with_options(&format!("diff-{seed}"));
    let out = run_env(
        &["init", &s(&fx.backends[0]), &url],
        &[],
        Duration::from_secs(60),
    );
    assert_ok(&out, "init with URL options");
    let backends = vec![s(&fx.backends[0]), url.clone()];
    let native = fx.path("native");
    fs::create_dir_all(native.join("dir/d2")).unwrap();
    let mut master = StdRng::seed_from_u64(seed);
    let mut mount = mount_env(&backends, &fx.mnt, &[], &[]);
    fs::create_dir_all(fx.mnt.join("dir/d2")).unwrap();
    let mut log = Vec::new();
    let mut succeeded: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for step in 0..ops {
        let op_seed: u64 = master.gen();
        let (desc, want) = apply_op(&native, op_seed);
        let (_, got) = apply_op(&fx.mnt, op_seed);
        log.push(format!("{step}: {desc} -> {want:?}"));
        let kind = desc.split(' ').next().unwrap_or("").to_string();
        let e = succeeded.entry(kind).or_default();
        e.0 += want.is_ok() as usize;
        e.1 += 1;
        let tail = log[log.len().saturating_sub(15)..].join("\n");
        assert_eq!(
            want, got,
            "seed {seed} step {step}: {desc}: native {want:?}, mirrorfs {got:?}\n{tail}"
        );
        if step % 50 == 49 {
            assert_same(
                &format!("seed {seed} step {step}"),
                &manifest(&native),
                &manifest(&fx.mnt),
            );
        }
        if step == ops / 2 {
            mount.unmount();
            mount = mount_env(&backends, &fx.mnt, &[], &[]);
        }
    }
    eprintln!("seed {seed}: {ops} ops, (succeeded, total) by kind: {succeeded:?}");
    for kind in ["write", "read", "truncate", "rename"] {
        assert!(
            succeeded[kind].0 >= 5,
            "too few successful {kind}s: {succeeded:?}"
        );
    }
    let want = manifest(&native);
    assert_same("end", &want, &manifest(&fx.mnt));
    mount.unmount();
    let m = mount_env(&[url], &fx.mnt, &["-o", "ro"], &[]);
    assert_same("the bucket alone, read-only", &want, &manifest(&fx.mnt));
    m.unmount();
}

// ---------------------------------------------------------------------------------------
// (c) outage
// ---------------------------------------------------------------------------------------

fn status_of(p: &Pair) -> (i32, String) {
    let out = p.mirrorfs(&["status", &s(&p.fx.mnt)]);
    (out.status.code().unwrap_or(-1), text(&out))
}

#[test]
fn s3_outage_degrades_then_recover_catches_up() {
    let mut p = Pair::new("outage");
    let mnt = p.fx.mnt.clone();
    let m = p.mount(&["--timeout", "3"]);
    assert_eq!(status_of(&p).0, 0, "optimal at start: {}", status_of(&p).1);

    // A stream of writes: new files, rewrites of a big file, renames.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, written, mnt) = (stop.clone(), written.clone(), mnt.clone());
        std::thread::spawn(move || -> Result<(), String> {
            let mut i = 0u64;
            fs::create_dir_all(mnt.join("w")).map_err(|e| e.to_string())?;
            while !stop.load(Ordering::Relaxed) {
                let data: Vec<u8> = (0..(i % 5) * 70_000 + 10).map(|x| (x + i) as u8).collect();
                let p = mnt.join(format!("w/f{}", i % 40));
                fs::write(&p, &data).map_err(|e| format!("write {}: {e}", p.display()))?;
                let big = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(mnt.join("big"))
                    .map_err(|e| e.to_string())?;
                big.write_all_at(&data, (i % 9) * 300_000)
                    .map_err(|e| format!("write big: {e}"))?;
                if i.is_multiple_of(7) {
                    let _ = fs::rename(mnt.join(format!("w/f{}", i % 40)), mnt.join("w/r"));
                }
                i += 1;
                written.store(i, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        })
    };
    let wait_writes = |n: u64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        let start = written.load(Ordering::Relaxed);
        while written.load(Ordering::Relaxed) < start + n {
            assert!(Instant::now() < deadline, "writes stalled");
            assert!(!writer.is_finished(), "the writer stopped");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_writes(20);
    p.garage.stop();

    // The bucket backend is degraded within a few seconds, with a reason.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (code, st) = loop {
        let (code, st) = status_of(&p);
        if code == 2 {
            break (code, st);
        }
        assert!(Instant::now() < deadline, "never degraded:\n{st}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(code, 2);
    let line = st
        .lines()
        .find(|l| l.contains(&p.url))
        .unwrap_or_else(|| panic!("no line for the bucket:\n{st}"));
    assert!(line.contains("degraded"), "{st}");
    assert!(
        line.contains("cannot reach") || line.contains("no answer within"),
        "the reason is shown: {st}"
    );
    // Writes go on while the server is down (for a while: health checks run too).
    let down = Instant::now();
    wait_writes(30);
    while down.elapsed() < Duration::from_secs(5) {
        wait_writes(1);
    }
    assert_eq!(status_of(&p).0, 2, "still degraded while down");
    p.garage.start();
    wait_writes(10);

    let out = p.mirrorfs(&["recover", &s(&mnt), &p.url, "--wait"]);
    assert_ok(&out, "recover --wait");
    wait_writes(10);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap().unwrap();
    assert_eq!(
        status_of(&p).0,
        0,
        "optimal after recovery: {}",
        status_of(&p).1
    );
    let whole = manifest(&mnt);
    m.unmount();

    for b in p.backends() {
        let m = p.mount_alone_ro(&b);
        assert_same(
            &format!("{b} alone after recovery"),
            &whole,
            &manifest(&mnt),
        );
        m.unmount();
    }
}

// ---------------------------------------------------------------------------------------
// (d) refusals
// ---------------------------------------------------------------------------------------

fn with(envs: &[(String, String)], key: &str, value: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = envs.iter().filter(|(k, _)| k != key).cloned().collect();
    v.push((key.to_string(), value.to_string()));
    v
}

#[test]
fn s3_bad_credentials_missing_bucket_and_dead_server() {
    let garage = Garage::start_new();
    let fx = Fixture::unformatted(2);
    let local = s(&fx.backends[0]);
    let good = garage.envs();
    let t = Duration::from_secs(60);
    let bucket_listing = |prefix: &str| {
        let url = format!("s3://{}/{prefix}", garage.bucket);
        let (_, store) = mirrorfs_open(&url, &good);
        store
    };

    // init: wrong secret, wrong key id, missing bucket, nothing listening.
    let bad_secret = with(&good, "AWS_SECRET_ACCESS_KEY", &"0".repeat(64));
    let out = run_env(&["init", &local, &garage.url("x")], &bad_secret, t);
    let line = assert_refused(&out, "init with a wrong secret");
    assert_eq!(
        line,
        "mirrorfs: access denied by s3://mirrorfs (check AWS_ACCESS_KEY_ID / \
         AWS_SECRET_ACCESS_KEY)"
    );
    let bad_key = with(&good, "AWS_ACCESS_KEY_ID", "GK000000000000000000000000");
    let out = run_env(&["init", &local, &garage.url("x")], &bad_key, t);
    assert!(assert_refused(&out, "init with an unknown key").contains("access denied by"));
    let out = run_env(&["init", &local, "s3://nosuchbucket/x"], &good, t);
    let line = assert_refused(&out, "init on a missing bucket");
    assert_eq!(
        line,
        format!(
            "mirrorfs: bucket \"nosuchbucket\" does not exist at {}",
            garage.endpoint()
        )
    );
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = format!("http://127.0.0.1:{dead_port}");
    let started = Instant::now();
    let out = run_env(
        &["init", &local, &garage.url("x")],
        &with(&good, "AWS_ENDPOINT_URL", &dead),
        t,
    );
    let line = assert_refused(&out, "init with nothing listening");
    assert_eq!(
        line,
        format!("mirrorfs: cannot reach {dead}: connection refused")
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a dead endpoint fails fast"
    );
    let out = run_env(&["init", &local, "s3://mirrorfs/x?colour=blue"], &good, t);
    assert!(assert_refused(&out, "unknown URL option").contains("unknown option colour"));
    // Nothing changed.
    assert_eq!(
        fs::read_dir(&fx.backends[0]).unwrap().count(),
        0,
        "local untouched"
    );
    assert!(bucket_listing("x").is_empty(), "bucket untouched");

    // Credentials from a profile named in the URL (the environment has none).
    let creds = fx.path("credentials");
    fs::write(
        &creds,
        format!(
            "[other]\naws_access_key_id = nope\n\n[mirror]\naws_access_key_id = {}\n\
             aws_secret_access_key = {}\n",
            garage.key_id, garage.secret
        ),
    )
    .unwrap();
    let config = fx.path("config");
    fs::write(
        &config,
        format!(
            "[profile mirror]\nregion = garage\nendpoint_url = {}\n",
            garage.endpoint()
        ),
    )
    .unwrap();
    let profile_env = vec![
        ("AWS_SHARED_CREDENTIALS_FILE".to_string(), s(&creds)),
        ("AWS_CONFIG_FILE".to_string(), s(&config)),
    ];
    let url = format!("s3://{}/m?profile=mirror", garage.bucket);
    let out = run_env(&["init", &local, &url], &profile_env, t);
    assert_ok(&out, "init with credentials from a profile");
    // The same profile chosen by AWS_PROFILE; a missing profile is refused.
    let out = run_env(
        &["init", &s(&fx.backends[1]), &garage.url("by-env")],
        &with(&profile_env, "AWS_PROFILE", "mirror"),
        t,
    );
    assert_ok(&out, "init with AWS_PROFILE");
    fs::remove_dir_all(&fx.backends[1]).unwrap();
    fs::create_dir(&fx.backends[1]).unwrap();
    let out = run_env(
        &["init", &s(&fx.backends[1]), &garage.url("none")],
        &with(&profile_env, "AWS_PROFILE", "nosuch"),
        t,
    );
    let line = assert_refused(&out, "a missing profile");
    assert!(line.contains("AWS profile \"nosuch\" not found"), "{line}");

    // A formatted prefix is not empty: init refuses it.
    let out = run_env(&["init", &s(&fx.backends[1]), &garage.url("m")], &good, t);
    assert!(assert_refused(&out, "init on a used prefix").contains("not empty"));
    assert_eq!(fs::read_dir(&fx.backends[1]).unwrap().count(), 0);

    // mount: the same refusals, in the background form (one line from the parent).
    let mnt = s(&fx.mnt);
    let url = garage.url("m");
    for (what, envs, backend, want) in [
        (
            "wrong secret",
            bad_secret.clone(),
            url.clone(),
            "mirrorfs: access denied by s3://mirrorfs (check AWS_ACCESS_KEY_ID / \
             AWS_SECRET_ACCESS_KEY)"
                .to_string(),
        ),
        (
            "missing bucket",
            good.clone(),
            "s3://nosuchbucket/m".to_string(),
            format!(
                "mirrorfs: bucket \"nosuchbucket\" does not exist at {}",
                garage.endpoint()
            ),
        ),
        (
            "dead endpoint",
            with(&good, "AWS_ENDPOINT_URL", &dead),
            url.clone(),
            format!("mirrorfs: cannot reach {dead}: connection refused"),
        ),
    ] {
        let out = run_env(&["mount", &local, &backend, &mnt], &envs, t);
        assert_eq!(assert_refused(&out, what), want, "mount: {what}");
        assert!(!is_mounted(&fx.mnt), "{what}: nothing mounted");
        let out = run_env(&["mount", "-f", &local, &backend, &mnt], &envs, t);
        assert_eq!(assert_refused(&out, what), want, "mount -f: {what}");
    }
    // The colon-list form that mount.fuse3 uses, with the good profile: it mounts.
    let list = format!("{local}:s3://{}/m?profile=mirror", garage.bucket);
    let out = run_env(&["mount", &list, &mnt], &profile_env, t);
    assert_ok(&out, "mount a:s3://... (background)");
    let _daemon = Daemon::new(&fx.mnt);
    let out = run_env(&["status", &mnt], &[], t);
    assert_ok(&out, "status");
    let st = text(&out);
    assert!(
        st.lines()
            .any(|l| l.trim_end().ends_with("s3://mirrorfs/m")),
        "location without options: {st}"
    );
    assert!(!st.contains("profile=mirror"), "{st}");
}

/// Opens a backend the way the binary does, in this process (for listings).
fn mirrorfs_open(
    url: &str,
    envs: &[(String, String)],
) -> (String, Arc<dyn mirrorfs::store::Store>) {
    // The library reads its settings from the environment of this process: pass them in
    // the URL instead so that parallel tests do not race on the environment.
    let get = |k: &str| {
        envs.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let full = format!(
        "{url}?endpoint={}&region={}&access_key_id={}&secret_access_key={}",
        get("AWS_ENDPOINT_URL"),
        get("AWS_REGION"),
        get("AWS_ACCESS_KEY_ID"),
        get("AWS_SECRET_ACCESS_KEY")
    );
    mirrorfs::store::spec::open_backend(&full, mirrorfs::store::spec::Purpose::Mount)
        .unwrap_or_else(|e| panic!("open {url}: {e}"))
}

trait Listing {
    fn is_empty(&self) -> bool;
}

impl Listing for Arc<dyn mirrorfs::store::Store> {
    fn is_empty(&self) -> bool {
        self.list("").expect("list").is_empty()
    }
}

// ---------------------------------------------------------------------------------------
// (e) health checks of an idle mount, replace by a bucket, the mount.fuse3 form
// ---------------------------------------------------------------------------------------

#[test]
fn s3_idle_outage_is_noticed_and_replace_by_a_bucket() {
    let mut p = Pair::new("idle");
    let mnt = s(&p.fx.mnt);
    let src = p.fx.path("src");
    make_tree(&src, 3, 30);
    let want = manifest(&src);

    // The form mount.fuse3 runs for an fstab line: no subcommand, a colon list, -o.
    let list = format!("{}:{}", s(&p.fx.backends[0]), p.url);
    let out = p.mirrorfs(&[&list, &mnt, "-o", "rw,timeout=3"]);
    assert_ok(&out, "mirrorfs SOURCE MOUNTPOINT -o ...");
    let daemon = Daemon::new(&p.fx.mnt);
    sh(&format!("cp -a {}/. {}/", q(&src), q(&p.fx.mnt)));

    // Nothing is written: the health check alone notices the dead server.
    p.garage.stop();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, st) = status_of(&p);
        if code == 2 {
            assert!(st.contains("cannot reach"), "reason shown: {st}");
            break;
        }
        assert!(Instant::now() < deadline, "idle outage not noticed:\n{st}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_same("served from the local backend", &want, &manifest(&p.fx.mnt));
    p.garage.start();

    // Replace the local backend (member 0) by a new bucket prefix, online.
    let new = p.garage.url("idle-new");
    let out = p.mirrorfs(&["recover", &mnt, &p.url, "--wait"]);
    assert_ok(&out, "recover");
    let out = p.mirrorfs(&["replace", &mnt, "0", &new, "--wait"]);
    assert_ok(&out, "replace by a bucket");
    let (code, st) = status_of(&p);
    assert_eq!(code, 0, "{st}");
    assert!(st.contains("s3://mirrorfs/idle-new"), "{st}");
    // A used prefix is refused as a replacement.
    let out = p.mirrorfs(&["replace", &mnt, "1", &p.url]);
    assert!(assert_refused(&out, "replace by a used prefix").contains("not empty"));
    assert!(daemon.stop(), "the daemon exits after unmount");

    for b in [new, p.url.clone()] {
        let m = p.mount_alone_ro(&b);
        assert_same(&format!("{b} alone"), &want, &manifest(&p.fx.mnt));
        m.unmount();
    }
}

// ---------------------------------------------------------------------------------------
// (f) the Store guarantees, on the store itself
// ---------------------------------------------------------------------------------------

#[test]
fn s3_store_semantics() {
    use mirrorfs::store::StoreError;
    let garage = Garage::start_new();
    let (location, st) = mirrorfs::store::spec::open_backend(
        &garage.url_with_options("sem/p/"),
        mirrorfs::store::spec::Purpose::Format,
    )
    .expect("open an empty prefix");
    assert_eq!(location, "s3://mirrorfs/sem/p");
    assert!(!st.ranged_writes());
    assert!(matches!(st.get("a/b"), Err(StoreError::NotFound)));
    assert!(matches!(st.size("a/b"), Err(StoreError::NotFound)));
    assert!(matches!(
        st.get_range("a/b", 0, 4),
        Err(StoreError::NotFound)
    ));
    assert!(matches!(st.delete("a/b"), Err(StoreError::NotFound)));

    st.put("a/b", b"hello").unwrap();
    assert_eq!(st.get("a/b").unwrap(), b"hello");
    assert_eq!(st.size("a/b").unwrap(), 5);
    assert_eq!(st.get_range("a/b", 1, 3).unwrap(), b"ell");
    assert_eq!(
        st.get_range("a/b", 3, 100).unwrap(),
        b"lo",
        "past the end: fewer bytes"
    );
    assert_eq!(st.get_range("a/b", 5, 10).unwrap(), b"", "at the end: none");
    assert_eq!(
        st.get_range("a/b", 50, 10).unwrap(),
        b"",
        "beyond the end: none"
    );
    st.write_at("a/b", 7, b"xy").unwrap();
    assert_eq!(
        st.get("a/b").unwrap(),
        b"hello\0\0xy",
        "a gap reads as zeros"
    );
    st.write_at("new", 3, b"z").unwrap();
    assert_eq!(st.get("new").unwrap(), b"\0\0\0z", "write_at creates");
    st.truncate("a/b", 2).unwrap();
    assert_eq!(st.get("a/b").unwrap(), b"he");
    st.truncate("a/b", 4).unwrap();
    assert_eq!(st.get("a/b").unwrap(), b"he\0\0", "growth reads as zeros");
    st.truncate("t", 3).unwrap();
    assert_eq!(st.get("t").unwrap(), b"\0\0\0", "truncate creates");
    st.put("empty", b"").unwrap();
    assert_eq!(st.get_range("empty", 0, 10).unwrap(), b"");
    let block: Vec<u8> = (0..(1 << 20)).map(|i| i as u8).collect();
    st.write_at("blk", 0, &block).unwrap();
    st.write_at("blk", 10, b"ab").unwrap();
    let mut want = block.clone();
    want[10..12].copy_from_slice(b"ab");
    assert_eq!(st.get("blk").unwrap(), want);
    st.create("log/1", b"1").unwrap();
    st.rewrite("log/10", b"10").unwrap();
    st.put("logx", b"x").unwrap();

    let mut keys = st.list("log/1").unwrap();
    keys.sort();
    assert_eq!(keys, vec!["log/1", "log/10"], "a partial name prefix");
    let mut all = st.list("").unwrap();
    all.sort();
    assert_eq!(
        all,
        vec!["a/b", "blk", "empty", "log/1", "log/10", "logx", "new", "t"]
    );
    st.sync().unwrap();
    st.delete("a/b").unwrap();
    assert!(matches!(st.get("a/b"), Err(StoreError::NotFound)));
    // The lease: exclusive while held (also against this same process), invisible to
    // listings, released when dropped; a reader only checks.
    use mirrorfs::store::LockIntent;
    let (_, again) = mirrorfs_open("s3://mirrorfs/sem/p", &garage.envs());
    assert!(again.lock(LockIntent::Read).unwrap().is_none());
    let lease = st.lock(LockIntent::Write).unwrap().expect("a lease");
    assert!(!st.list("").unwrap().contains(&".lock".to_string()));
    for intent in [LockIntent::Write, LockIntent::Read] {
        let err = again.lock(intent).err().expect("held").to_string();
        assert!(err.contains("in use by another mirrorfs mount"), "{err}");
    }
    drop(lease);
    assert!(matches!(st.get(".lock"), Err(StoreError::NotFound)));
    drop(again.lock(LockIntent::Write).unwrap().expect("free again"));
    assert!(st.check().is_err(), "no superblock yet");
    st.put("superblock", b"{}").unwrap();
    assert_eq!(st.check(), Ok(()));
    // Another prefix of the same bucket sees none of it; this one is no longer empty.
    let (_, other) = mirrorfs_open("s3://mirrorfs/sem/p2", &garage.envs());
    assert!(other.list("").unwrap().is_empty());
    let err = mirrorfs::store::spec::open_backend(
        &garage.url_with_options("sem/p"),
        mirrorfs::store::spec::Purpose::Format,
    )
    .err()
    .expect("a used prefix is refused for init");
    assert_eq!(err, "backend s3://mirrorfs/sem/p is not empty");
}

// ---------------------------------------------------------------------------------------
// (g) a hung server
// ---------------------------------------------------------------------------------------

#[test]
fn s3_hung_server_is_degraded_by_the_timeout() {
    let p = Pair::new("hung");
    let mnt = p.fx.mnt.clone();
    let m = p.mount(&["--timeout", "3"]);
    fs::write(mnt.join("before"), b"before").unwrap();
    p.garage.pause(true);
    // A write while nothing answers returns within about the timeout, from the local backend.
    let t = Instant::now();
    fs::write(mnt.join("during"), vec![7u8; 300_000]).unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "write took {:?}",
        t.elapsed()
    );
    let (code, st) = status_of(&p);
    assert_eq!(code, 2, "{st}");
    assert!(st.contains("no answer within"), "{st}");
    for i in 0..20 {
        fs::write(mnt.join(format!("f{i}")), format!("{i}")).unwrap();
    }
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "writes took {:?}",
        t.elapsed()
    );
    p.garage.pause(false);
    let out = p.mirrorfs(&["recover", &s(&mnt), &p.url, "--wait"]);
    assert_ok(&out, "recover after the server answers again");
    let whole = manifest(&mnt);
    m.unmount();
    let m = p.mount_alone_ro(&p.url);
    assert_same("the bucket alone", &whole, &manifest(&mnt));
    m.unmount();
}

// ---------------------------------------------------------------------------------------
// checksums, scrub, fsck and a crash with a bucket in the mirror
// ---------------------------------------------------------------------------------------

#[test]
fn s3_checksums_scrub_fsck_and_crash() {
    let p = Pair::new("integrity/m");
    let mnt = p.fx.mnt.clone();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let m = p.mount(&[]);
    fs::write(mnt.join("f"), &data).unwrap();
    let ino = fs::metadata(mnt.join("f")).unwrap().ino();
    m.unmount();

    // A flipped byte in block 1 of the local copy: reads prefer the local disk, find the
    // damage, answer from the bucket and repair the local copy.
    let block = p.fx.backends[0].join(format!("b/{:02x}/{:016x}.{:08x}", ino & 0xff, ino, 1));
    let mut raw = fs::read(&block).unwrap();
    raw[4096 + 777] ^= 0x10;
    fs::write(&block, &raw).unwrap();
    let m = p.mount(&[]);
    assert!(
        fs::read(mnt.join("f")).unwrap() == data,
        "wrong bytes returned"
    );
    let st = p.mirrorfs(&["status", &s(&mnt), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert_eq!(v["backends"][0]["checksum_errors"], 1, "{v:#}");
    let out = p.mirrorfs(&["scrub", &s(&mnt), "--wait"]);
    assert_ok(&out, "scrub");
    assert!(
        text(&out).contains("0 repaired, 0 unrecoverable"),
        "{}",
        text(&out)
    );

    // Killed while writing in 10 KiB pieces: the bucket held partial blocks in memory.
    let mut f = File::create(mnt.join("g")).unwrap();
    for piece in data.chunks(10 * 1024).take(150) {
        f.write_all(piece).unwrap();
    }
    f.sync_all().unwrap();
    for piece in data.chunks(10 * 1024).skip(150) {
        f.write_all(piece).unwrap();
    }
    drop(f);
    let fh = File::create(mnt.join("h")).unwrap();
    fh.write_at(&data[..300_000], 0).unwrap();
    m.kill();
    let m = p.mount(&[]);
    let g = fs::read(mnt.join("g")).unwrap();
    assert!(g == data, "g: closed before the crash, so complete");
    let whole = manifest(&mnt);
    m.unmount();
    let out = p.mirrorfs(&["fsck", &s(&p.fx.backends[0]), &p.url]);
    assert_ok(&out, "fsck after the crash");
    for b in p.backends() {
        let m = p.mount_alone_ro(&b);
        assert_same(
            &format!("{b} alone after the crash"),
            &whole,
            &manifest(&mnt),
        );
        m.unmount();
    }
}

// ---------------------------------------------------------------------------------------
// (h) one mount per bucket prefix: the lease
// ---------------------------------------------------------------------------------------

/// A lease record of a mount on another machine, renewed `age` seconds ago.
fn foreign_lease(age: u64) -> Vec<u8> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    serde_json::json!({
        "token": "someone-else", "host": "elsewhere", "boot_id": "another-boot",
        "pid": 4242, "start": 1, "renewed": now - age,
    })
    .to_string()
    .into_bytes()
}

fn lease_holder(st: &Arc<dyn mirrorfs::store::Store>) -> Option<serde_json::Value> {
    match st.get(".lock") {
        Ok(raw) => Some(serde_json::from_slice(&raw).expect("lease is JSON")),
        Err(mirrorfs::store::StoreError::NotFound) => None,
        Err(e) => panic!("read the lease: {e}"),
    }
}

#[test]
fn s3_lease_keeps_a_second_mount_out() {
    let p = Pair::new("lease");
    let mnt = p.fx.mnt.clone();
    let other = p.fx.path("other");
    fs::create_dir(&other).unwrap();
    let (_, st) = mirrorfs_open(&p.url, &p.garage.envs());
    let try_mount = |extra: &[&str]| {
        let mut args = vec!["mount", "-f"];
        args.extend_from_slice(extra);
        args.extend([p.url.as_str(), other.to_str().unwrap()]);
        p.mirrorfs(&args)
    };

    let m = p.mount(&[]);
    fs::write(mnt.join("a"), b"a").unwrap();
    assert_eq!(lease_holder(&st).expect("a lease")["pid"], m.pid());
    assert!(!st.list("").unwrap().iter().any(|k| k == ".lock"), "listed");
    // A second mount, read-write or read-only, and fsck are refused, naming the holder.
    for extra in [&["-o", "degraded"][..], &["-o", "ro"][..]] {
        let line = assert_refused(&try_mount(extra), &format!("second mount {extra:?}"));
        assert!(
            line.contains("in use by another mirrorfs mount")
                && line.contains(&format!("pid {}", m.pid())),
            "{line}"
        );
    }
    let line = assert_refused(&p.mirrorfs(&["fsck", &p.url]), "fsck of a mounted bucket");
    assert!(line.contains("in use"), "{line}");

    // Killed: the next mount on this machine takes the lease over at once.
    m.kill();
    let m = p.mount(&[]);
    assert_eq!(fs::read(mnt.join("a")).unwrap(), b"a");
    m.unmount();
    assert!(
        lease_holder(&st).is_none(),
        "a clean unmount releases the lease"
    );

    // A live lease of another machine keeps mounts out; a stale one is taken over.
    st.put(".lock", &foreign_lease(0)).unwrap();
    let line = assert_refused(
        &try_mount(&["-o", "degraded"]),
        "mount under a foreign lease",
    );
    assert!(line.contains("host elsewhere"), "{line}");
    let line = assert_refused(&try_mount(&["-o", "ro"]), "ro mount under a foreign lease");
    assert!(line.contains("host elsewhere"), "{line}");
    st.put(".lock", &foreign_lease(3600)).unwrap();
    let m = p.mount(&[]);
    assert_eq!(lease_holder(&st).expect("a lease")["pid"], m.pid());

    // Taken over under a live mount (as when this one was frozen past its expiry): the
    // mount sees it at its next renewal, degrades the bucket and goes on with the rest.
    st.put(".lock", &foreign_lease(0)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let (code, text) = status_of(&p);
        if code == 2 {
            assert!(text.contains("taken over by another mount"), "{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a lost lease not noticed:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    fs::write(mnt.join("b"), b"b").unwrap();
    m.unmount();
    let holder = lease_holder(&st).expect("the other mount's lease is left alone");
    assert_eq!(holder["host"], "elsewhere");
}
