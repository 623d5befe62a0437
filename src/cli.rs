//! The `mirrorfs` command: argument parsing, `init`, and `mount` (foreground or daemon).
//!
//! Every failure is reported as one line on stderr, `mirrorfs: <what went wrong>`, with a
//! non-zero exit status, and is detected before anything is changed on disk.
//!
//! `mount` without `-f` starts a copy of itself in the foreground mode, in a new session,
//! and waits until that copy reports over a pipe that the mount is live (or why it failed).
//! This is also how `mount.fuse3` runs it for an fstab line of type `fuse.mirrorfs`: it calls
//! `mirrorfs SOURCE MOUNTPOINT -o OPTIONS`, which is read as `mirrorfs mount ...`.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fuser::{MountOption, SessionACL};
use log::info;

use crate::control::{self, ClientError};
use crate::fs::Fs;
use crate::fuse::MirrorFuse;
use crate::mirror::{Mirror, MirrorOptions};
use crate::store::spec::{backend_location, open_backend, split_backends, Purpose};
use crate::store::{NamedStores, Store};

/// Environment variable through which a daemonised mount reports readiness.
const READY_FD_ENV: &str = "MIRRORFS_READY_FD";

#[derive(Parser, Debug)]
#[command(
    name = "mirrorfs",
    version,
    about = "A FUSE filesystem mirrored over several backends"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Format empty directories (or bucket prefixes) as the backends of one new mirror.
    Init {
        /// Backend directories or `s3://bucket/prefix` URLs (each must exist and be empty).
        #[arg(required = true, value_name = "BACKEND")]
        backends: Vec<PathBuf>,
    },
    /// Mount a mirror: `mirrorfs mount BACKEND... MOUNTPOINT` (or `a:b:c MOUNTPOINT`).
    Mount(MountArgs),
    /// Show the state of a mount; exit 0 optimal, 1 recovering, 2 degraded or failed,
    /// 3 not a mirrorfs mount.
    Status {
        mountpoint: PathBuf,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Take a backend out of service (reason: disabled by operator).
    Disable {
        mountpoint: PathBuf,
        /// A backend path as given at mount, or its member id.
        backend: String,
    },
    /// Resynchronise a degraded backend while the mount keeps serving.
    Recover {
        mountpoint: PathBuf,
        /// A backend path as given at mount, or its member id.
        backend: String,
        /// Wait (with a progress bar on a terminal) until the backend is optimal.
        #[arg(long)]
        wait: bool,
    },
    /// Verify every object on every optimal backend and repair bad copies from good ones,
    /// while the mount serves. With --wait: exit 0 when every object has a good copy
    /// everywhere, 2 when some could not be repaired.
    Scrub {
        mountpoint: PathBuf,
        /// Wait (with a progress bar on a terminal) and print the outcome.
        #[arg(long)]
        wait: bool,
    },
    /// Check unmounted backends: object graph, link counts, sizes, checksums, and that the
    /// backends agree. Exit 0 clean, 1 problems found and all repaired, 2 damage left.
    Fsck {
        /// The backends of one filesystem (not mounted): directories or bucket URLs.
        #[arg(required = true, value_name = "BACKEND")]
        backends: Vec<String>,
        /// Repair what can be repaired.
        #[arg(long)]
        repair: bool,
    },
    /// Put a new empty directory in the place of a backend and fill it online.
    Replace {
        mountpoint: PathBuf,
        /// The backend to replace (path or member id).
        old: String,
        /// An existing empty directory or bucket prefix (`s3://bucket/prefix`).
        new: PathBuf,
        /// Wait (with a progress bar on a terminal) until the new backend is optimal.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(clap::Args, Debug)]
struct MountArgs {
    /// Stay in the foreground (Ctrl-C unmounts).
    #[arg(short = 'f', long)]
    foreground: bool,
    /// Mount options, comma-separated (as mount.fuse3 passes them).
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
    /// Refuse writes (EROFS) while fewer than N backends are optimal.
    #[arg(long, value_name = "N")]
    min_optimal: Option<usize>,
    /// Degrade a backend that does not answer within SECS seconds.
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    /// Backends, then the mount point; a backend argument may be a colon-separated list.
    #[arg(required = true, num_args = 1.., value_name = "BACKEND... MOUNTPOINT")]
    paths: Vec<PathBuf>,
}

/// A one-line failure for the user.
struct Fail(String);

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(e: E) -> Fail {
        Fail(e.to_string())
    }
}

/// Entry point of the binary; returns the exit status.
pub fn main() -> i32 {
    let args = implicit_mount(std::env::args_os().collect());
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => return clap_error(e),
    };
    let result = match cli.command {
        Command::Init { backends } => init(&backends),
        Command::Mount(args) => mount(args),
        Command::Status { mountpoint, json } => return status(&mountpoint, json),
        Command::Disable {
            mountpoint,
            backend,
        } => disable(&mountpoint, &backend),
        Command::Recover {
            mountpoint,
            backend,
            wait,
        } => recover(&mountpoint, &backend, wait),
        Command::Replace {
            mountpoint,
            old,
            new,
            wait,
        } => replace(&mountpoint, &old, &new, wait),
        Command::Scrub { mountpoint, wait } => match scrub(&mountpoint, wait) {
            Ok(true) => return 0,
            Ok(false) => return 2,
            Err(e) => Err(e),
        },
        Command::Fsck { backends, repair } => return fsck(&backends, repair),
    };
    match result {
        Ok(()) => 0,
        Err(Fail(msg)) => {
            // A daemonised mount tells its waiting parent, which prints the message.
            if !report_ready(Err(&msg)) {
                eprintln!("mirrorfs: {msg}");
            }
            1
        }
    }
}

/// `mirrorfs SOURCE MOUNTPOINT -o OPTS` (as run by mount.fuse3) means `mirrorfs mount ...`.
fn implicit_mount(mut args: Vec<OsString>) -> Vec<OsString> {
    let subcommands = [
        "init", "mount", "status", "disable", "recover", "replace", "scrub", "fsck", "help",
    ];
    if let Some(first) = args.get(1).and_then(|a| a.to_str().map(str::to_owned)) {
        if !first.starts_with('-') && !subcommands.contains(&first.as_str()) {
            args.insert(1, "mount".into());
        }
    } else if args.get(1).is_some() {
        args.insert(1, "mount".into());
    }
    args
}

/// Prints clap's error as a single line (help and version are printed as they are).
fn clap_error(e: clap::Error) -> i32 {
    use clap::error::{ContextKind, ErrorKind};
    match e.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = e.print();
            return 0;
        }
        ErrorKind::MissingRequiredArgument
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let what = e
                .get(ContextKind::InvalidArg)
                .map(|v| v.to_string())
                .unwrap_or_else(|| "a command (init or mount)".into());
            eprintln!("mirrorfs: missing argument: {what}");
        }
        _ => {
            let text = e.render().to_string();
            let line = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("mirrorfs: {}", line.trim_start_matches("error: "));
        }
    }
    2
}

// ----- init ------------------------------------------------------------------------------

fn init(backends: &[PathBuf]) -> Result<(), Fail> {
    let mut described: Vec<(String, Arc<dyn Store>)> = Vec::new();
    for path in backends {
        let (location, store) = open_backend(&path.to_string_lossy(), Purpose::Format)?;
        if described.iter().any(|(l, _)| *l == location) {
            return Err(Fail(format!("backend {} is given twice", path.display())));
        }
        described.push((location, store));
    }

    // SAFETY: getuid/getgid have no preconditions and cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    match crate::mirror::format(&described, &Fs::root_batch(uid, gid)) {
        Ok(uuid) => {
            // Create the lock files of directories now, so that a later read-only mount
            // changes nothing (a bucket's lease is only looked at).
            for (_, store) in &described {
                let _ = store.lock(crate::store::LockIntent::Read);
            }
            println!("formatted {} backend(s) as mirror {uuid}", described.len());
            Ok(())
        }
        Err(e) => {
            for (location, store) in &described {
                clean_backend(location, store.as_ref());
            }
            Err(Fail(format!("cannot format the backends: {e}")))
        }
    }
}

/// Removes what a failed init wrote, leaving the directory (or bucket prefix) empty again.
fn clean_backend(location: &str, store: &dyn Store) {
    if crate::store::remote::is_url(location) {
        for key in store.list("").unwrap_or_default() {
            let _ = store.delete(&key);
        }
        return;
    }
    let root = Path::new(location);
    if let Ok(entries) = std::fs::read_dir(root) {
        for entry in entries.flatten() {
            let p = entry.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

// ----- mount -----------------------------------------------------------------------------

/// What the `-o` options asked for.
#[derive(Default)]
struct MountSettings {
    fuse: Vec<MountOption>,
    acl: Option<SessionACL>,
    read_only: bool,
    degraded: bool,
    min_optimal: Option<usize>,
    timeout: Option<f64>,
    write_buffer_mib: Option<usize>,
}

fn parse_options(opts: &[String]) -> Result<MountSettings, Fail> {
    let mut s = MountSettings::default();
    for opt in opts
        .iter()
        .flat_map(|o| o.split(','))
        .filter(|o| !o.is_empty())
    {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        match (key, value) {
            ("ro", None) => s.read_only = true,
            ("rw", None) => s.read_only = false,
            ("allow_other", None) => s.acl = Some(SessionACL::All),
            ("allow_root", None) => s.acl = Some(SessionACL::RootAndOwner),
            ("auto_unmount", None) => s.fuse.push(MountOption::AutoUnmount),
            ("dev", None) => s.fuse.push(MountOption::Dev),
            ("nodev", None) => s.fuse.push(MountOption::NoDev),
            ("suid", None) => s.fuse.push(MountOption::Suid),
            ("nosuid", None) => s.fuse.push(MountOption::NoSuid),
            ("exec", None) => s.fuse.push(MountOption::Exec),
            ("noexec", None) => s.fuse.push(MountOption::NoExec),
            ("atime", None) => s.fuse.push(MountOption::Atime),
            ("noatime", None) => s.fuse.push(MountOption::NoAtime),
            ("sync", None) => s.fuse.push(MountOption::Sync),
            ("async", None) => s.fuse.push(MountOption::Async),
            ("dirsync", None) => s.fuse.push(MountOption::DirSync),
            ("fsname", Some(v)) => s.fuse.push(MountOption::FSName(v.into())),
            ("subtype", Some(v)) => s.fuse.push(MountOption::Subtype(v.into())),
            ("degraded", None) => s.degraded = true,
            ("min_optimal", Some(v)) => {
                s.min_optimal = Some(v.parse().map_err(|_| Fail(format!("bad value: {opt}")))?)
            }
            ("timeout", Some(v)) => {
                s.timeout = Some(v.parse().map_err(|_| Fail(format!("bad value: {opt}")))?)
            }
            ("write_buffer_mib", Some(v)) => {
                let mib: usize = v.parse().map_err(|_| Fail(format!("bad value: {opt}")))?;
                if mib == 0 {
                    return Err(Fail(format!("bad value: {opt} (at least 1)")));
                }
                s.write_buffer_mib = Some(mib);
            }
            // Accepted and ignored: permission checks are always done by the kernel, and
            // these are fstab/mount(8) options that mount.fuse3 may pass through.
            ("default_permissions" | "relatime" | "defaults" | "nofail" | "_netdev", None)
            | ("auto" | "noauto" | "user" | "users" | "nouser", None) => {}
            (k, _) if k.starts_with("x-") || k.starts_with("comment=") => {}
            _ => return Err(Fail(format!("unknown mount option: {opt}"))),
        }
    }
    Ok(s)
}

fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines()
        .any(|l| l.split(' ').nth(4).map(unescape_mountinfo).as_deref() == Some(&want))
}

fn unescape_mountinfo(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
}

fn mount(args: MountArgs) -> Result<(), Fail> {
    if args.paths.len() < 2 {
        return Err(Fail(
            "missing argument: give at least one backend and a mount point".into(),
        ));
    }
    let mut settings = parse_options(&args.options)?;
    settings.min_optimal = args.min_optimal.or(settings.min_optimal);
    settings.timeout = args.timeout.or(settings.timeout);
    let (mnt, backend_args) = args.paths.split_last().expect("two or more paths");
    let backend_args: Vec<String> = backend_args
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let backends = split_backends(&backend_args);
    if backends.is_empty() {
        return Err(Fail("no backend given".into()));
    }
    check_mountpoint(mnt)?;
    if !args.foreground {
        return daemonize();
    }
    run_foreground(&backends, mnt, settings)
}

fn check_mountpoint(mnt: &Path) -> Result<(), Fail> {
    if !mnt.exists() {
        return Err(Fail(format!(
            "mount point {} does not exist",
            mnt.display()
        )));
    }
    if !mnt.is_dir() {
        return Err(Fail(format!(
            "mount point {} is not a directory",
            mnt.display()
        )));
    }
    let canon = mnt.canonicalize()?;
    if is_mount_point(&canon) {
        let error = std::fs::read_dir(mnt).err().and_then(|e| e.raw_os_error());
        if error == Some(libc::ENOTCONN) {
            return Err(Fail(format!(
                "mount point {m} is a dead mount (its process ended); unmount it first with \
                 fusermount3 -u {m}",
                m = mnt.display()
            )));
        }
        return Err(Fail(format!(
            "mount point {} is busy: already mounted",
            mnt.display()
        )));
    }
    Ok(())
}

fn open_stores(backends: &[String]) -> Result<NamedStores, Fail> {
    let mut stores: Vec<(String, Arc<dyn Store>)> = Vec::new();
    for b in backends {
        stores.push(open_backend(b, Purpose::Mount)?);
    }
    Ok(stores)
}

fn run_foreground(backends: &[String], mnt: &Path, s: MountSettings) -> Result<(), Fail> {
    let stores = open_stores(backends)?;
    let mut opts = MirrorOptions {
        read_only: s.read_only,
        allow_missing: s.degraded,
        ..MirrorOptions::default()
    };
    if let Some(n) = s.min_optimal {
        opts.min_optimal = n;
    }
    if let Some(mib) = s.write_buffer_mib {
        opts.write_buffer = mib << 20;
    }
    if let Some(t) = s.timeout {
        if !(t > 0.0 && t.is_finite()) {
            return Err(Fail(format!("bad timeout: {t}")));
        }
        opts.timeout = Duration::from_secs_f64(t);
    }
    let mirror = Arc::new(Mirror::open(stores, opts)?);
    let read_only = mirror.read_only();
    let fs = Arc::new(
        Fs::new(Arc::clone(&mirror)).map_err(|e| Fail(format!("cannot read the root: {e}")))?,
    );
    if !read_only {
        Fs::start_writeback(&fs);
        Fs::install_key_locker(&fs);
    }

    let mut config = fuser::Config::default();
    // URLs without their options, which may hold secrets (the source shows in mountinfo).
    let source: Vec<String> = backends
        .iter()
        .map(|b| match crate::store::remote::is_url(b) {
            true => backend_location(b),
            false => b.clone(),
        })
        .collect();
    config.mount_options = vec![
        MountOption::FSName(source.join(":")),
        MountOption::Subtype("mirrorfs".into()),
        MountOption::DefaultPermissions,
    ];
    config.mount_options.extend(s.fuse);
    if s.read_only {
        config.mount_options.push(MountOption::RO);
    }
    config.acl = s.acl.unwrap_or(SessionACL::Owner);
    config.n_threads = Some(1);

    let mut session = fuser::Session::new(MirrorFuse::new(fs), mnt, &config)
        .map_err(|e| Fail(format!("cannot mount on {}: {e}", mnt.display())))?;
    info!("mounted {} on {}", source.join(", "), mnt.display());
    // Runs once the session serves requests: the stat it needs is answered by this process.
    let mnt_owned = mnt.to_path_buf();
    std::thread::spawn(move || raise_readahead(&mnt_owned));
    let canonical = mnt.canonicalize()?;
    let _control = control::serve(Arc::clone(&mirror), canonical)
        .map_err(|e| Fail(format!("cannot start the control socket: {e}")))?;
    mirror.resume_recoveries();
    mirror.start_health_checks();
    let unmounter = session.unmount_callable();
    spawn_signal_handler(unmounter, mnt.to_path_buf())?;
    let _ = report_ready(Ok(()));
    let ended = session.run();
    mirror.release_locks();
    ended.map_err(|e| Fail(format!("session ended with an error: {e}")))?;
    info!("unmounted {}", mnt.display());
    Ok(())
}

/// How far the kernel reads ahead on a mount: eight blocks of [`crate::fuse::MAX_IO`], sent
/// as that many requests at once. The kernel's default of 128 KiB makes a sequential read pay
/// the per-request cost eight times per block, and one block at a time leaves a bucket's
/// latency per GET exposed (64 MiB read from a bucket alone on a local Garage: 57 MB/s with
/// 1 MiB, 159 MB/s with 8 MiB); reads from directories are not slower.
const READAHEAD: u32 = 8 * crate::fuse::MAX_IO;

/// Sets this mount's readahead to [`READAHEAD`]. Best effort: needs root, and only changes
/// this mount's own bdi.
fn raise_readahead(mnt: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(mnt) else {
        return;
    };
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    let kib = READAHEAD / 1024;
    if let Err(e) = std::fs::write(&path, format!("{kib}\n")) {
        log::debug!("cannot raise readahead via {path}: {e}");
    }
}

/// SIGINT, SIGTERM and SIGHUP unmount the filesystem; the session then ends normally.
fn spawn_signal_handler(mut unmounter: fuser::SessionUnmounter, mnt: PathBuf) -> Result<(), Fail> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                info!("signal {sig}: unmounting {}", mnt.display());
                if let Err(e) = unmounter.unmount() {
                    log::warn!("unmount of {} failed: {e}; retrying lazily", mnt.display());
                    let _ = std::process::Command::new("fusermount3")
                        .arg("-uz")
                        .arg(&mnt)
                        .status();
                }
            }
        })?;
    Ok(())
}

/// Tells a waiting parent (see [`daemonize`]) that the mount is live, or why it is not.
/// Returns false when there is no waiting parent.
fn report_ready(result: Result<(), &str>) -> bool {
    let Some(fd) = std::env::var(READY_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return false;
    };
    std::env::remove_var(READY_FD_ENV);
    // SAFETY: the fd was created for us by the parent and is used only here, once.
    let mut pipe = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let msg = match result {
        Ok(()) => "ok\n".to_string(),
        Err(m) => format!("{m}\n"),
    };
    let _ = pipe.write_all(msg.as_bytes());
    if result.is_ok() {
        detach_stdio();
    }
    true
}

/// Points stdin, stdout and stderr at /dev/null so that a daemon holds no caller's pipe.
fn detach_stdio() {
    let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    else {
        return;
    };
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors of this process with a valid source fd.
        unsafe { libc::dup2(null.as_raw_fd(), fd) };
    }
}

/// Runs this same command again in the foreground, in a new session, and waits until it
/// says the mount is live.
fn daemonize() -> Result<(), Fail> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills the two-element array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Fail(format!("pipe: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: both fds were just created by pipe2 and are owned here.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The child must inherit the write end: clear its close-on-exec flag.
    // SAFETY: fcntl on an fd we own.
    unsafe { libc::fcntl(write_end.as_raw_fd(), libc::F_SETFD, 0) };

    let mut args: Vec<OsString> = implicit_mount(std::env::args_os().collect());
    let pos = args
        .iter()
        .position(|a| a == "mount")
        .expect("mount subcommand");
    args.insert(pos + 1, "-f".into());
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(&args[1..])
        .env(READY_FD_ENV, write_end.as_raw_fd().to_string())
        // Only warnings reach the terminal before the daemon detaches from it.
        .env(
            "MIRRORFS_LOG",
            std::env::var("MIRRORFS_LOG").unwrap_or_else(|_| "warn,fuser=error".into()),
        )
        .stdin(std::process::Stdio::null());
    // SAFETY: setsid is async-signal-safe and only detaches the child from our terminal.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    drop(write_end);

    let mut answer = String::new();
    let _ = std::fs::File::from(read_end).read_to_string(&mut answer);
    match answer.lines().next() {
        Some("ok") => Ok(()),
        Some(msg) => {
            let _ = child.wait();
            Err(Fail(msg.trim_start_matches("mirrorfs: ").to_string()))
        }
        None => {
            let status = child.wait()?;
            Err(Fail(format!(
                "mount process exited before the mount was live ({status})"
            )))
        }
    }
}

// ----- management commands ----------------------------------------------------------------

/// Exit status of `status` for a path that is not a mirrorfs mount.
const NOT_A_MOUNT: i32 = 3;

fn ask(mnt: &Path, req: serde_json::Value) -> Result<serde_json::Value, Fail> {
    control::request(mnt, &req).map_err(|e| match e {
        ClientError::NotAMount(m) | ClientError::Refused(m) => Fail(m),
    })
}

fn status(mnt: &Path, as_json: bool) -> i32 {
    let answer = match control::request(mnt, &serde_json::json!({"cmd": "status"})) {
        Ok(a) => a,
        Err(ClientError::NotAMount(m)) => {
            eprintln!("mirrorfs: {m}");
            return NOT_A_MOUNT;
        }
        Err(ClientError::Refused(m)) => {
            eprintln!("mirrorfs: {m}");
            return 2;
        }
    };
    let st = &answer["status"];
    if as_json {
        println!("{}", serde_json::to_string_pretty(st).unwrap_or_default());
    } else {
        print_status(st);
    }
    match st["state"].as_str() {
        Some("optimal") => 0,
        Some("recovering") => 1,
        _ => 2,
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn print_status(st: &serde_json::Value) {
    println!(
        "{}: {} (filesystem {}, generation {}, writes need {} optimal{})",
        st["mountpoint"].as_str().unwrap_or("?"),
        st["state"].as_str().unwrap_or("?"),
        st["fs_uuid"].as_str().unwrap_or("?"),
        st["generation"],
        st["min_optimal"],
        if st["read_only"] == serde_json::json!(true) {
            ", read-only"
        } else {
            ""
        }
    );
    let scrub = &st["scrub"];
    if !scrub.is_null() {
        let n = |field: &str| scrub[field].as_u64().unwrap_or(0);
        let what = if scrub["running"] == serde_json::json!(true) {
            format!(
                "scrub running: {}/{} objects, {} at {}/s",
                n("objects_done"),
                n("objects_total"),
                human_bytes(n("bytes_done")),
                human_bytes(n("rate_bytes_per_sec"))
            )
        } else {
            format!(
                "last scrub: {} objects checked in {:.1}s",
                n("objects_done"),
                scrub["seconds"].as_f64().unwrap_or(0.0)
            )
        };
        println!(
            "  {what}; {} repaired, {} unrecoverable, {} errors",
            n("repaired"),
            n("unrecoverable"),
            n("errors")
        );
    }
    let empty = Vec::new();
    for b in st["backends"].as_array().unwrap_or(&empty) {
        let state = b["state"].as_str().unwrap_or("?");
        let mut detail = match state {
            "recovering" => {
                let r = &b["recovery"];
                let total = r["objects_total"].as_u64().unwrap_or(0);
                let done = r["objects_done"].as_u64().unwrap_or(0);
                format!(
                    "recovering: {done}/{total} objects, {} of {}, {}/s",
                    human_bytes(r["bytes_done"].as_u64().unwrap_or(0)),
                    human_bytes(r["bytes_total"].as_u64().unwrap_or(0)),
                    human_bytes(r["rate_bytes_per_sec"].as_u64().unwrap_or(0))
                )
            }
            _ => b["reason"].as_str().unwrap_or("").to_string(),
        };
        if !detail.is_empty() {
            detail = format!("  ({detail})");
        }
        println!(
            "  member {:<3} {:<11} {}{}",
            b["id"],
            state,
            b["location"].as_str().unwrap_or("?"),
            detail
        );
        println!(
            "             reads {}, writes {}, errors: read {}, write {}, checksum {}",
            b["reads"], b["writes"], b["read_errors"], b["write_errors"], b["checksum_errors"]
        );
    }
}

/// A backend argument as the mount will understand it: a canonical path when it names an
/// existing directory, `scheme://bucket/prefix` for a URL, the text itself otherwise (a
/// member id).
fn backend_spec(spec: &str) -> String {
    backend_location(spec)
}

fn disable(mnt: &Path, backend: &str) -> Result<(), Fail> {
    let answer = ask(
        mnt,
        serde_json::json!({"cmd": "disable", "backend": backend_spec(backend)}),
    )?;
    println!("member {} disabled", answer["member"]);
    Ok(())
}

fn recover(mnt: &Path, backend: &str, wait: bool) -> Result<(), Fail> {
    let req = serde_json::json!({"cmd": "recover", "backend": backend_spec(backend)});
    let answer = ask(mnt, req)?;
    let id = answer["member"].as_u64().unwrap_or(0);
    if wait {
        wait_optimal(mnt, id)
    } else {
        println!("recovery of member {id} started; see mirrorfs status");
        Ok(())
    }
}

fn replace(mnt: &Path, old: &str, new: &Path, wait: bool) -> Result<(), Fail> {
    let new_arg = new.to_string_lossy();
    if crate::store::remote::is_url(&new_arg) {
        // Opened (and checked empty) by the mount, which has the credentials in use.
        let req = serde_json::json!({
            "cmd": "replace",
            "old": backend_spec(old),
            "new": new_arg,
        });
        let id = ask(mnt, req)?["member"].as_u64().unwrap_or(0);
        return if wait {
            wait_optimal(mnt, id)
        } else {
            println!(
                "member {id} is being rebuilt on {}; see mirrorfs status",
                backend_spec(&new_arg)
            );
            Ok(())
        };
    }
    if !new.is_dir() {
        return Err(Fail(format!(
            "{} is not an existing directory",
            new.display()
        )));
    }
    let new = new.canonicalize()?;
    let req = serde_json::json!({
        "cmd": "replace",
        "old": backend_spec(old),
        "new": new.display().to_string(),
    });
    let answer = ask(mnt, req)?;
    let id = answer["member"].as_u64().unwrap_or(0);
    if wait {
        wait_optimal(mnt, id)
    } else {
        println!(
            "member {id} is being rebuilt on {}; see mirrorfs status",
            new.display()
        );
        Ok(())
    }
}

fn fsck(backends: &[String], repair: bool) -> i32 {
    let stores = match open_stores(backends) {
        Ok(s) => s,
        Err(Fail(msg)) => {
            eprintln!("mirrorfs: {msg}");
            return 2;
        }
    };
    match crate::fsck::run(stores, repair) {
        Ok(report) => {
            for line in &report.lines {
                println!("{line}");
            }
            println!("{}", report.summary());
            report.exit_code()
        }
        Err(msg) => {
            eprintln!("mirrorfs: {msg}");
            2
        }
    }
}

/// Starts a scrub; with `wait`, returns whether every object ended up with good copies.
fn scrub(mnt: &Path, wait: bool) -> Result<bool, Fail> {
    ask(mnt, serde_json::json!({"cmd": "scrub"}))?;
    if !wait {
        println!("scrub started; see mirrorfs status");
        return Ok(true);
    }
    use std::io::IsTerminal;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        let style = indicatif::ProgressStyle::with_template(
            "{spinner} scrub: [{bar:30}] {pos}/{len} objects  {msg}",
        )
        .expect("valid template")
        .progress_chars("=> ");
        bar.set_style(style);
        bar
    });
    loop {
        let answer = ask(mnt, serde_json::json!({"cmd": "status"}))?;
        let p = &answer["status"]["scrub"];
        let n = |field: &str| p[field].as_u64().unwrap_or(0);
        if p["running"] != serde_json::json!(true) {
            if let Some(bar) = &bar {
                bar.finish_and_clear();
            }
            println!(
                "scrub of {}: {} objects checked ({}), {} repaired, {} unrecoverable, \
                 {} errors, in {:.1}s",
                mnt.display(),
                n("objects_done"),
                human_bytes(n("bytes_done")),
                n("repaired"),
                n("unrecoverable"),
                n("errors"),
                p["seconds"].as_f64().unwrap_or(0.0)
            );
            if n("unrecoverable") > 0 || n("errors") > 0 {
                eprintln!("mirrorfs: scrub left damage it could not repair; see the mount's log");
                return Ok(false);
            }
            return Ok(true);
        }
        if let Some(bar) = &bar {
            bar.set_length(n("objects_total"));
            bar.set_position(n("objects_done"));
            bar.set_message(format!(
                "{} at {}/s, {} repaired",
                human_bytes(n("bytes_done")),
                human_bytes(n("rate_bytes_per_sec")),
                n("repaired")
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Polls the mount until member `id` is optimal (Ok) or no longer recovering (Err, why).
fn wait_optimal(mnt: &Path, id: u64) -> Result<(), Fail> {
    use std::io::IsTerminal;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        let style = indicatif::ProgressStyle::with_template(
            "{spinner} member {prefix}: [{bar:30}] {pos}/{len} objects  {msg}",
        )
        .expect("valid template")
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(id.to_string());
        bar
    });
    loop {
        let answer = ask(mnt, serde_json::json!({"cmd": "status"}))?;
        let empty = Vec::new();
        let members = answer["status"]["backends"].as_array().unwrap_or(&empty);
        let Some(b) = members.iter().find(|b| b["id"].as_u64() == Some(id)) else {
            return Err(Fail(format!("member {id} is no longer part of the mount")));
        };
        match b["state"].as_str() {
            Some("optimal") => {
                if let Some(bar) = &bar {
                    bar.finish_and_clear();
                }
                println!(
                    "member {id} ({}) is optimal",
                    b["location"].as_str().unwrap_or("?")
                );
                return Ok(());
            }
            Some("recovering") => {
                if let Some(bar) = &bar {
                    let r = &b["recovery"];
                    bar.set_length(r["objects_total"].as_u64().unwrap_or(0));
                    bar.set_position(r["objects_done"].as_u64().unwrap_or(0));
                    bar.set_message(format!(
                        "{} at {}/s",
                        human_bytes(r["bytes_done"].as_u64().unwrap_or(0)),
                        human_bytes(r["rate_bytes_per_sec"].as_u64().unwrap_or(0))
                    ));
                }
            }
            _ => {
                if let Some(bar) = &bar {
                    bar.abandon();
                }
                let why = b["reason"].as_str().unwrap_or("unknown reason");
                return Err(Fail(format!("member {id} is not optimal: {why}")));
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
