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

pub mod garage;

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

/// Runs `cmd` to completion with a deadline (a hang guard, not a timing assertion): a
/// command still running after `timeout` is killed and the test fails, showing its stderr.
/// Output goes to files, so a chatty command never blocks on a full pipe.
pub fn run_timed(cmd: &mut Command, timeout: Duration) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "command still running after {timeout:?}; killed: {cmd:?}\nstderr: {}",
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: std::fs::read(&out_path).expect("read stdout"),
        stderr: std::fs::read(&err_path).expect("read stderr"),
    }
}

/// The exit code of a command (-1 when killed by a signal).
pub fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

/// stdout and stderr of a command, for messages.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts a command succeeded, showing its output otherwise.
#[track_caller]
pub fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: expected success, got {}:\n{}",
        out.status,
        text(out)
    );
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

/// Unmounts `mnt`, retrying `fusermount3 -u` for up to 30 s while it is busy (another
/// test's child may briefly hold a descriptor of a file in it), then lazily.
pub fn unmount(mnt: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while is_mounted(mnt) && Instant::now() < deadline {
        let ok = Command::new("fusermount3")
            .arg("-u")
            .arg(mnt)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    if is_mounted(mnt) {
        let _ = Command::new("fusermount3").arg("-uz").arg(mnt).status();
    }
}

/// Single-quotes a path for a shell command line.
pub fn q(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

/// True when the tests run as root (tmpfs mounts, other users).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Asserts two multi-line texts are equal, showing only the lines that differ.
#[track_caller]
pub fn assert_same(what: &str, want: &str, got: &str) {
    if want == got {
        return;
    }
    let w: std::collections::BTreeSet<&str> = want.lines().collect();
    let g: std::collections::BTreeSet<&str> = got.lines().collect();
    let missing: Vec<&&str> = w.difference(&g).take(20).collect();
    let extra: Vec<&&str> = g.difference(&w).take(20).collect();
    panic!("{what}: trees differ\nexpected but missing: {missing:#?}\nunexpected: {extra:#?}");
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
        Mount::start_env(backends, mnt, extra, &[])
    }

    /// [`Mount::start`] with extra environment variables for the mount process.
    pub fn start_env<B: AsRef<std::ffi::OsStr>>(
        backends: &[B],
        mnt: &Path,
        extra: &[&str],
        envs: &[(String, String)],
    ) -> Mount {
        let mut cmd = Command::new(bin());
        cmd.arg("mount").arg("-f");
        cmd.args(extra);
        cmd.args(backends);
        cmd.arg(mnt);
        cmd.envs(envs.iter().map(|(k, v)| (k, v)));
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

    /// The pid of the mount process.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the mount process runs").id()
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

    /// Kills the mount process with SIGKILL, as a crash would, reaps it, and clears the dead
    /// mount with a lazy unmount.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("fusermount3")
            .arg("-uz")
            .arg(&self.mnt)
            .status();
    }

    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        unmount(&self.mnt);
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

/// Guard for a mount whose `mirrorfs` process is not a child of the test (it daemonized,
/// or mount.fuse3 started it). The process is found by the unique mountpoint path on its
/// command line. Dropping the guard unmounts and waits for the process to exit, killing
/// it as a last resort.
pub struct Daemon {
    mnt: PathBuf,
}

impl Daemon {
    pub fn new(mnt: &Path) -> Daemon {
        Daemon {
            mnt: mnt.to_path_buf(),
        }
    }

    /// Pids of processes with the mountpoint as a whole argument on their command line.
    pub fn pids(&self) -> Vec<i32> {
        let mut pat = String::new();
        for ch in self.mnt.display().to_string().chars() {
            if !ch.is_ascii_alphanumeric() && ch != '/' {
                pat.push('\\');
            }
            pat.push(ch);
        }
        pat.push_str("( |$)");
        let out = Command::new("pgrep")
            .arg("-f")
            .arg(&pat)
            .output()
            .expect("run pgrep");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|s| s.parse().ok())
            .filter(|&p: &i32| p != std::process::id() as i32)
            .collect()
    }

    /// Waits until no process serves the mountpoint any more; false on timeout.
    pub fn wait_gone(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.pids().is_empty() {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }

    /// Unmounts (lazily if need be) and waits for the daemon; true if it exited by itself.
    pub fn stop(&self) -> bool {
        unmount(&self.mnt);
        if self.wait_gone(Duration::from_secs(30)) {
            return true;
        }
        for pid in self.pids() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        false
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs an unmount command (`umount MNT`, `fusermount3 -u MNT`), retrying for a while when
/// the mount is busy: a process spawned concurrently by another test may briefly hold a
/// copy of a descriptor of a file in the mount (between its fork and exec).
pub fn unmount_cmd(program: &str, args: &[String]) -> Output {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = Command::new(program)
            .args(args)
            .output()
            .expect("run unmount");
        let busy = String::from_utf8_lossy(&out.stderr).contains("busy");
        if out.status.success() || !busy || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
