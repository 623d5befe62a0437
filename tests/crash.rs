//! Crash loop: the mount process is killed with SIGKILL at random moments of a write-heavy
//! workload with fsyncs; after each kill the filesystem is mounted again and must hold every
//! byte that was fsync'ed (and every acknowledged unlink), its backends must be identical,
//! and fsck must find nothing. About a third of the rounds also pretend that the machine
//! rebooted, so that the mount checks everything instead of trusting its journal.
//!
//! `MIRRORFS_CRASH_ROUNDS` sets the number of rounds (default 30); `MIRRORFS_CRASH_SEED` the
//! seed (default: random, printed so that a failure can be replayed).

mod common;

use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};

/// A `mirrorfs mount -f` child that can be killed; dropping it always unmounts and reaps.
struct Victim {
    child: Option<Child>,
    mnt: PathBuf,
}

impl Victim {
    /// Starts a mount whose log is appended to `log`.
    fn start(backends: &[PathBuf], mnt: &Path, log: &Path) -> Victim {
        let log_path = log;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open the mount log");
        let child = Command::new(bin())
            .arg("mount")
            .arg("-f")
            .args(backends)
            .arg(mnt)
            .env("MIRRORFS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn mirrorfs mount");
        let mut v = Victim {
            child: Some(child),
            mnt: mnt.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_mounted(mnt) {
            if let Some(status) = v.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "mount exited before it was live: {status}\nmount log:\n{}",
                    log_tail(log_path)
                );
            }
            assert!(Instant::now() < deadline, "mount did not become live");
            std::thread::sleep(Duration::from_millis(10));
        }
        v
    }

    /// SIGKILL. The dead mount stays in place (every access fails) until [`Victim::clear`]:
    /// a lazy unmount now would let a writer still running write into the directory under
    /// the mount point instead, and take that for success.
    fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Removes the dead mount (see `Drop`).
    fn clear(self) {}

    /// A clean unmount; panics unless the process exits successfully.
    fn unmount(mut self) {
        let mut child = self.child.take().expect("running");
        unmount(&self.mnt);
        let status = child.wait().expect("wait");
        assert!(status.success(), "mirrorfs exited with {status}");
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mounted(&self.mnt) {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&self.mnt)
                .status();
        }
    }
}

/// Above this many bytes of files, the workload removes files instead of adding more, so
/// that the test's disk use stays bounded however many rounds it runs.
const DISK_BUDGET: usize = 64 << 20;

/// What the workload may rely on: file name -> content, for files whose last change was
/// fsync'ed (or whose removal was acknowledged: then they are absent from the map).
type Durable = BTreeMap<String, Vec<u8>>;

/// Writes until an operation fails (the mount was killed) or `stop` is set. Files listed in
/// `durable` are only ever changed in ways that are recorded there once fsync'ed.
fn workload(mnt: &Path, seed: u64, mut durable: Durable, stop: Arc<AtomicBool>) -> Durable {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut serial = 0u64;
    while !stop.load(Ordering::Relaxed) {
        serial += 1;
        let full = durable.values().map(Vec::len).sum::<usize>() > DISK_BUDGET;
        let step = (|| -> std::io::Result<()> {
            match if full { 8 } else { rng.gen_range(0..10) } {
                // A new file written in pieces, then fsync'ed.
                0..=4 => {
                    let name = format!("f{seed:x}-{serial}");
                    let len = rng.gen_range(0..3 << 20);
                    let data: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                    let mut f = std::fs::File::create(mnt.join(&name))?;
                    for piece in data.chunks(rng.gen_range(1000..300_000)) {
                        f.write_all(piece)?;
                    }
                    f.sync_all()?;
                    durable.insert(name, data);
                }
                // Overwrite a range of an existing file in place, then fsync.
                5..=6 => {
                    let Some(name) = pick(&mut rng, &durable) else {
                        return Ok(());
                    };
                    let mut content = durable[&name].clone();
                    let at = rng.gen_range(0..=content.len());
                    let patch: Vec<u8> =
                        (0..rng.gen_range(1..200_000)).map(|_| rng.gen()).collect();
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(mnt.join(&name))?;
                    f.seek(SeekFrom::Start(at as u64))?;
                    // Until the fsync returns, either content may be found after a crash.
                    durable.remove(&name);
                    f.write_all(&patch)?;
                    f.sync_all()?;
                    if content.len() < at + patch.len() {
                        content.resize(at + patch.len(), 0);
                    }
                    content[at..at + patch.len()].copy_from_slice(&patch);
                    durable.insert(name, content);
                }
                // Rename (acknowledged = done on every backend).
                7 => {
                    let Some(name) = pick(&mut rng, &durable) else {
                        return Ok(());
                    };
                    let new = format!("{name}r");
                    let content = durable.remove(&name).expect("picked");
                    std::fs::rename(mnt.join(&name), mnt.join(&new))?;
                    durable.insert(new, content);
                }
                // Unlink.
                8 => {
                    let Some(name) = pick(&mut rng, &durable) else {
                        return Ok(());
                    };
                    durable.remove(&name);
                    std::fs::remove_file(mnt.join(&name))?;
                }
                // Truncate, then fsync.
                _ => {
                    let Some(name) = pick(&mut rng, &durable) else {
                        return Ok(());
                    };
                    let mut content = durable.remove(&name).expect("picked");
                    let len = rng.gen_range(0..=content.len() + 100_000);
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(mnt.join(&name))?;
                    f.set_len(len as u64)?;
                    f.sync_all()?;
                    content.resize(len, 0);
                    durable.insert(name, content);
                }
            }
            Ok(())
        })();
        if step.is_err() {
            break;
        }
    }
    durable
}

fn pick(rng: &mut impl Rng, durable: &Durable) -> Option<String> {
    if durable.is_empty() {
        return None;
    }
    durable.keys().nth(rng.gen_range(0..durable.len())).cloned()
}

fn check_durable(mnt: &Path, durable: &Durable) -> Result<(), String> {
    for (name, want) in durable {
        let got = std::fs::read(mnt.join(name))
            .map_err(|e| format!("fsync'ed file {name} unreadable: {e}"))?;
        if got != *want {
            return Err(format!(
                "{name} has {} bytes, {} were fsync'ed (first difference at {:?})",
                got.len(),
                want.len(),
                got.iter().zip(want).position(|(a, b)| a != b)
            ));
        }
    }
    Ok(())
}

/// Gives the superblocks another boot id than this machine's, as if it had rebooted since
/// the crash (the page cache survives here, so no data is really lost).
fn pretend_reboot(backends: &[PathBuf]) {
    for b in backends {
        let path = b.join("superblock");
        let raw = std::fs::read(&path).expect("read the superblock");
        let mut sb: serde_json::Value = serde_json::from_slice(&raw).expect("superblock JSON");
        sb["boot_id"] = "a boot before the crash".into();
        std::fs::write(&path, serde_json::to_vec_pretty(&sb).unwrap()).expect("write it");
    }
}

/// The last lines of the mounts' log, for a failure message.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[test]
fn sigkill_loop_keeps_fsynced_data_and_identical_backends() {
    let rounds: usize = std::env::var("MIRRORFS_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let seed: u64 = std::env::var("MIRRORFS_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("crash loop: {rounds} rounds, MIRRORFS_CRASH_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let fx = Fixture::new(2);
    let log = fx.path("mounts.log");
    let mut durable = Durable::new();
    for round in 0..rounds {
        let victim = Victim::start(&fx.backends, &fx.mnt, &log);
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let mnt = fx.mnt.clone();
            let stop = Arc::clone(&stop);
            let before = durable.clone();
            let wseed = rng.gen();
            std::thread::spawn(move || workload(&mnt, wseed, before, stop))
        };
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..1200)));
        let mut victim = victim;
        victim.kill();
        stop.store(true, Ordering::Relaxed);
        durable = writer.join().expect("workload thread");
        victim.clear();
        // Some rounds pretend the machine rebooted, which makes the mount distrust its
        // journal and check everything instead.
        let reboot = rng.gen_bool(0.3);
        if reboot {
            pretend_reboot(&fx.backends);
        }

        // The next mount repairs; every fsync'ed byte must be there.
        let victim = Victim::start(&fx.backends, &fx.mnt, &log);
        if let Err(e) = check_durable(&fx.mnt, &durable) {
            panic!(
                "round {round} (seed {seed}, reboot: {reboot}): {e}\nmount log:\n{}",
                log_tail(&log)
            );
        }
        victim.unmount();

        let fsck = mirrorfs(
            ["fsck".as_ref()]
                .into_iter()
                .chain(fx.backends.iter().map(|b| b.as_os_str())),
        );
        assert!(
            fsck.status.success(),
            "round {round} (seed {seed}, reboot: {reboot}): fsck found damage:\n{}{}",
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );
        // Identical backends: each one alone shows the same tree.
        let mut trees = Vec::new();
        for b in &fx.backends {
            let m = fx.mount_with(std::slice::from_ref(b), &["-o", "ro"]);
            trees.push(tree_manifest(&fx.mnt));
            m.unmount();
        }
        assert_same(
            &format!("round {round}: backend b1 against b0"),
            &trees[0],
            &trees[1],
        );
    }
    eprintln!(
        "crash loop: {} files, {} bytes durable at the end",
        durable.len(),
        durable.values().map(Vec::len).sum::<usize>()
    );
}
