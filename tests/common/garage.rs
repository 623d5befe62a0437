//! A throw-away single-node Garage S3 server for the tests and the benchmark.
//!
//! [`Garage::start_new`] finds the `garage` binary (PATH, then `~/.cargo/bin`), writes a
//! configuration in a temporary directory (replication factor 1, LMDB metadata, every port
//! on 127.0.0.1 and free), starts the server, assigns and applies a layout, and creates one
//! key and one bucket. [`Garage::stop`] and [`Garage::start`] take the same server down and
//! up again (same data and ports) to simulate an outage; dropping the guard kills it.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::Mount;

/// The region the test servers announce (S3 signatures must name it).
pub const REGION: &str = "garage";

/// `n` random bytes as hex: the RPC secret, key id and secret are made anew per server.
fn random_hex(n: usize) -> String {
    (0..n)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// Finds the `garage` binary, or panics saying how to install it.
pub fn garage_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("garage");
            if p.is_file() {
                return p;
            }
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        let p = PathBuf::from(home).join(".cargo/bin/garage");
        if p.is_file() {
            return p;
        }
    }
    panic!("garage is not installed: run .ci/install-deps");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// A running (or stopped) Garage node.
pub struct Garage {
    pub dir: tempfile::TempDir,
    bin: PathBuf,
    config: PathBuf,
    pub s3_port: u16,
    pub bucket: String,
    /// The access key id (`GK` + 24 hex digits) and its secret (64 hex digits).
    pub key_id: String,
    pub secret: String,
    child: Option<Child>,
}

impl Garage {
    /// Starts a fresh node with one key and one bucket (`mirrorfs`).
    pub fn start_new() -> Garage {
        let bin = garage_bin();
        let dir = tempfile::Builder::new()
            .prefix("mirrorfs-garage-")
            .tempdir()
            .expect("tempdir");
        let (s3_port, rpc_port, admin_port) = (free_port(), free_port(), free_port());
        let config = dir.path().join("garage.toml");
        let meta = dir.path().join("meta");
        let data = dir.path().join("data");
        let text = format!(
            "metadata_dir = \"{meta}\"\n\
             data_dir = \"{data}\"\n\
             db_engine = \"lmdb\"\n\
             lmdb_map_size = \"4G\"\n\
             replication_factor = 1\n\
             rpc_bind_addr = \"127.0.0.1:{rpc_port}\"\n\
             rpc_public_addr = \"127.0.0.1:{rpc_port}\"\n\
             rpc_secret = \"{secret}\"\n\
             \n\
             [s3_api]\n\
             s3_region = \"{REGION}\"\n\
             api_bind_addr = \"127.0.0.1:{s3_port}\"\n\
             root_domain = \".s3.garage.localhost\"\n\
             \n\
             [admin]\n\
             api_bind_addr = \"127.0.0.1:{admin_port}\"\n",
            meta = meta.display(),
            data = data.display(),
            secret = random_hex(32),
        );
        std::fs::write(&config, text).expect("write garage config");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut g = Garage {
            dir,
            bin,
            config,
            s3_port,
            bucket: "mirrorfs".into(),
            key_id: format!("GK{}", random_hex(12)),
            secret: random_hex(32),
            child: None,
        };
        g.start();
        let id = g.cli_ok(&["node", "id", "-q"]);
        let id = id.trim().split('@').next().unwrap().to_string();
        g.cli_ok(&["layout", "assign", "-z", "dc1", "-c", "10GB", &id]);
        g.cli_ok(&["layout", "apply", "--version", "1"]);
        let (key_id, secret) = (g.key_id.clone(), g.secret.clone());
        g.cli_ok(&["key", "import", "--yes", "-n", "test", &key_id, &secret]);
        let bucket = g.bucket.clone();
        g.create_bucket(&bucket);
        g
    }

    /// Creates a bucket that the test key may read and write.
    pub fn create_bucket(&self, name: &str) {
        // Right after the layout is applied the tables may need a moment.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.cli(&["bucket", "create", name]);
            if out.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "garage bucket create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        self.cli_ok(&[
            "bucket", "allow", "--read", "--write", "--owner", name, "--key", "test",
        ]);
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .expect("run garage")
    }

    fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "garage {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts the server (again) and waits until its S3 port and RPC answer.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "garage is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .expect("open garage log");
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn garage server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let up = std::net::TcpStream::connect(("127.0.0.1", self.s3_port)).is_ok()
                && self.cli(&["status"]).status.success();
            if up {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "garage server exited ({status}): {}",
                    std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "garage did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server (SIGKILL, like a crash or a network cut); data and ports are kept.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes (`SIGSTOP`) or thaws (`SIGCONT`) the server: connections are accepted by the
    /// kernel but nothing answers, like a hung server.
    pub fn pause(&self, frozen: bool) {
        let child = self.child.as_ref().expect("garage is running");
        let sig = if frozen { libc::SIGSTOP } else { libc::SIGCONT };
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
        unsafe { libc::kill(child.id() as i32, sig) };
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// `s3://BUCKET/PREFIX`, configured through the environment ([`Garage::envs`]).
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// `s3://BUCKET/PREFIX?endpoint=..&region=..&access_key_id=..&secret_access_key=..`:
    /// needs no environment.
    pub fn url_with_options(&self, prefix: &str) -> String {
        format!(
            "s3://{}/{prefix}?endpoint={}&region={REGION}&access_key_id={}\
             &secret_access_key={}",
            self.bucket,
            self.endpoint(),
            self.key_id,
            self.secret
        )
    }

    /// The AWS environment for a child process that uses this server.
    pub fn envs(&self) -> Vec<(String, String)> {
        let none = self.dir.path().join("no-such-file").display().to_string();
        vec![
            ("AWS_ENDPOINT_URL".into(), self.endpoint()),
            ("AWS_REGION".into(), REGION.into()),
            ("AWS_ACCESS_KEY_ID".into(), self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret.clone()),
            ("AWS_CONFIG_FILE".into(), none.clone()),
            ("AWS_SHARED_CREDENTIALS_FILE".into(), none),
        ]
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `mirrorfs ARGS...` with extra environment variables.
pub fn mirrorfs_env<S: AsRef<std::ffi::OsStr>>(args: &[S], envs: &[(String, String)]) -> Output {
    Command::new(super::bin())
        .args(args)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .expect("run mirrorfs")
}

/// Like [`Mount::start`], with extra environment variables for the mount process.
pub fn mount_env(
    backends: &[String],
    mnt: &Path,
    extra: &[&str],
    envs: &[(String, String)],
) -> Mount {
    Mount::start_env(backends, mnt, extra, envs)
}
