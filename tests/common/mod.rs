//! Shared fixtures for the integration tests: temporary backends, real FUSE mounts driven
//! through the `mirrorfs` binary, and a guard that always unmounts.
//!
//! Every mount made here runs `mirrorfs mount -f` as a child process of the test. Dropping
//! the [`Mount`] guard unmounts with `fusermount3 -u` (falling back to a lazy unmount), then
//! waits for the child to exit, killing it if it does not. A test that panics half-way
//! therefore never leaves a mount or a process behind.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of the binary under test, built by cargo for integration tests.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_mirrorfs")
}

/// Runs `mirrorfs ARGS...` to completion and returns its output.
pub fn mirrorfs<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run mirrorfs")
}

/// Runs a shell command line and panics with its output if it fails.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("bash")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "command failed: {cmd}\nstatus: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// True when `path` is a mount point listed in /proc/self/mountinfo.
pub fn is_mounted(path: &Path) -> bool {
    let want = path.to_string_lossy().into_owned();
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .any(|line| line.split(' ').nth(4) == Some(want.as_str()))
}

/// A temporary directory holding `n` backends (`b0`, `b1`, ...) and a mount point `mnt`.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub backends: Vec<PathBuf>,
    pub mnt: PathBuf,
}

impl Fixture {
    /// Creates `n` empty backend directories and formats them with `mirrorfs init`.
    pub fn new(n: usize) -> Fixture {
        let fx = Fixture::unformatted(n);
        let out = mirrorfs(std::iter::once("init".as_ref()).chain(fx.backend_args()));
        assert!(
            out.status.success(),
            "mirrorfs init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        fx
    }

    /// Creates `n` empty backend directories without formatting them.
    pub fn unformatted(n: usize) -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("mirrorfs-test-")
            .tempdir()
            .expect("tempdir");
        let backends: Vec<PathBuf> = (0..n).map(|i| dir.path().join(format!("b{i}"))).collect();
        for b in &backends {
            std::fs::create_dir(b).expect("create backend dir");
        }
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("create mountpoint");
        Fixture { dir, backends, mnt }
    }

    /// The backend paths as command-line arguments.
    pub fn backend_args(&self) -> impl Iterator<Item = &std::ffi::OsStr> {
        self.backends.iter().map(|b| b.as_os_str())
    }

    /// A scratch path inside the fixture's temporary directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Mounts all backends read-write at `self.mnt`.
    pub fn mount(&self) -> Mount {
        Mount::start(&self.backends, &self.mnt, &[])
    }

    /// Mounts the given backends at `self.mnt` with extra arguments (e.g. `-o ro`).
    pub fn mount_with(&self, backends: &[PathBuf], extra: &[&str]) -> Mount {
        Mount::start(backends, &self.mnt, extra)
    }
}

/// A live mount. Dropping it unmounts and reaps the `mirrorfs` process.
pub struct Mount {
    pub mnt: PathBuf,
    child: Option<Child>,
}

impl Mount {
    /// Starts `mirrorfs mount -f EXTRA... BACKENDS... MNT` and waits until the mount is live.
    pub fn start(backends: &[PathBuf], mnt: &Path, extra: &[&str]) -> Mount {
        let mut cmd = Command::new(bin());
        cmd.arg("mount").arg("-f");
        cmd.args(extra);
        cmd.args(backends);
        cmd.arg(mnt);
        cmd.stdin(Stdio::null());
        cmd.stdout(Stdio::null());
        cmd.stderr(Stdio::inherit());
        let child = cmd.spawn().expect("spawn mirrorfs mount");
        let mut mount = Mount {
            mnt: mnt.to_path_buf(),
            child: Some(child),
        };
        mount.wait_live();
        mount
    }

    fn wait_live(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(&self.mnt) {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                panic!("mirrorfs mount exited before the mount was live: {status}");
            }
            assert!(Instant::now() < deadline, "mount did not become live");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A path inside the mount.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// Unmounts and waits for the process; panics if the process failed.
    pub fn unmount(mut self) {
        let status = self.stop();
        assert!(
            status.map(|s| s.success()).unwrap_or(false),
            "mirrorfs exited with {status:?}"
        );
    }

    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while is_mounted(&self.mnt) && Instant::now() < deadline {
            let ok = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.mnt)
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if is_mounted(&self.mnt) {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&self.mnt)
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    return child.wait().ok();
                }
            }
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Lists every file under `root` with its type, mode, size, link count and content hash,
/// one line per entry, sorted; used to compare two trees.
pub fn tree_manifest(root: &Path) -> String {
    sh(&format!(
        "cd '{}' && find . -mindepth 1 -printf '%P %y %m %s %n %U %G %l\\n' | sort && \
         find . -type f -print0 | sort -z | xargs -0 -r sha256sum",
        root.display()
    ))
}
