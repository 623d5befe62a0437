//! How the `mirrorfs` command talks to a running mount.
//!
//! Each read-write or read-only mount listens on a Unix socket whose name is derived from its
//! canonical mount point ([`socket_path`]), in `/run/mirrorfs` for root (or
//! `$XDG_RUNTIME_DIR/mirrorfs`, else `/tmp/mirrorfs-<uid>`), with mode 0600 so that only the
//! user who mounted can ask. A client connects, writes one JSON request on one line, and reads
//! one JSON answer line: `{"ok": true, ...}` or `{"ok": false, "error": "..."}`.
//!
//! Requests: `{"cmd": "status"}`, `{"cmd": "disable", "backend": B}`,
//! `{"cmd": "recover", "backend": B}`, `{"cmd": "replace", "old": B, "new": PATH}`,
//! `{"cmd": "scrub"}`, where B is
//! a member id or a backend path. A path that is not a socket of a live mount means "not a
//! mirrorfs mount".

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::{debug, warn};
use serde_json::{json, Value};

use crate::mirror::{BackendState, Mirror};
use crate::store::spec::{open_backend, Purpose};
use crate::store::{LocalStore, Store};

/// The directory holding the control sockets of this user's mounts.
fn socket_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/mirrorfs");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("mirrorfs"),
        None => PathBuf::from(format!("/tmp/mirrorfs-{uid}")),
    }
}

/// The control socket of the mount at `mountpoint` (which must be canonical).
pub fn socket_path(mountpoint: &Path) -> PathBuf {
    let hash = blake3::hash(mountpoint.as_os_str().as_encoded_bytes());
    let name: String = hash.as_bytes()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    socket_dir().join(format!("{name}.sock"))
}

/// Removes the socket when the mount ends.
pub struct Server {
    path: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Starts answering requests for the mount of `mirror` at `mountpoint` (canonical).
pub fn serve(mirror: Arc<Mirror>, mountpoint: PathBuf) -> std::io::Result<Server> {
    let path = socket_path(&mountpoint);
    let dir = path.parent().expect("socket has a directory");
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    if path.exists() {
        if UnixStream::connect(&path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("another mount answers on {}", path.display()),
            ));
        }
        std::fs::remove_file(&path)?;
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let mirror = Arc::clone(&mirror);
                let mnt = mountpoint.clone();
                let _ = std::thread::Builder::new()
                    .name("control-conn".into())
                    .spawn(move || handle(conn, &mirror, &mnt));
            }
        })?;
    Ok(Server { path })
}

fn handle(conn: UnixStream, mirror: &Arc<Mirror>, mnt: &Path) {
    let mut line = String::new();
    let mut reader = BufReader::new(&conn);
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let answer = match serde_json::from_str::<Value>(&line) {
        Ok(req) => answer(&req, mirror, mnt),
        Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
    };
    debug!("control request {} answered", line.trim());
    let mut out = answer.to_string();
    out.push('\n');
    let _ = (&conn).write_all(out.as_bytes());
}

fn answer(req: &Value, mirror: &Arc<Mirror>, mnt: &Path) -> Value {
    let arg = |name: &str| {
        req.get(name)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let result: Result<Value, String> = match req.get("cmd").and_then(Value::as_str) {
        Some("status") => Ok(json!({"status": status(mirror, mnt)})),
        Some("disable") => resolve(mirror, &arg("backend"))
            .and_then(|id| mirror.disable(id).map(|()| json!({"member": id}))),
        Some("recover") => resolve(mirror, &arg("backend"))
            .and_then(|id| mirror.start_recovery(id).map(|()| json!({"member": id}))),
        Some("replace") => replace(mirror, &arg("old"), &arg("new")),
        Some("scrub") => mirror.start_scrub().map(|_| json!({})),
        _ => Err("unknown request".into()),
    };
    match result {
        Ok(mut v) => {
            v["ok"] = json!(true);
            v
        }
        Err(e) => {
            warn!("control request refused: {e}");
            json!({"ok": false, "error": e})
        }
    }
}

/// Finds the member id named by `spec`: a member id, or a backend path in any spelling.
fn resolve(mirror: &Mirror, spec: &str) -> Result<u32, String> {
    let backends = mirror.backends();
    if let Ok(id) = spec.parse::<u32>() {
        if backends.iter().any(|b| b.id == id) {
            return Ok(id);
        }
    }
    let canonical = std::fs::canonicalize(spec).map(|p| p.display().to_string());
    let wanted = canonical.as_deref().unwrap_or(spec);
    let found = backends
        .iter()
        .find(|b| b.location == wanted || b.location == spec);
    found
        .map(|b| b.id)
        .ok_or_else(|| format!("{spec} is not a backend of this mount"))
}

fn replace(mirror: &Arc<Mirror>, old: &str, new: &str) -> Result<Value, String> {
    let id = resolve(mirror, old)?;
    if crate::store::remote::is_url(new) {
        let (location, store) = open_backend(new, Purpose::Format)?;
        mirror.replace(id, location, store)?;
        return Ok(json!({"member": id}));
    }
    let path = std::fs::canonicalize(new).map_err(|e| format!("{new}: {e}"))?;
    if !path.is_dir() {
        return Err(format!("{new} is not a directory"));
    }
    let mut entries = std::fs::read_dir(&path).map_err(|e| format!("{new}: {e}"))?;
    if entries.next().is_some() {
        return Err(format!("{new} is not empty"));
    }
    let store = LocalStore::open(&path).map_err(|e| format!("{new}: {e}"))?;
    let location = store.describe();
    mirror.replace(id, location, Arc::new(store))?;
    Ok(json!({"member": id}))
}

/// The state of the array: recovering, optimal, failed or degraded.
fn array_state(mirror: &Mirror) -> &'static str {
    let backends = mirror.backends();
    let all_present = mirror
        .superblock()
        .members
        .iter()
        .all(|m| backends.iter().any(|b| b.id == m.id));
    if backends
        .iter()
        .any(|b| matches!(b.state(), BackendState::Recovering(_)))
    {
        "recovering"
    } else if mirror.optimal_count() == 0 {
        "failed"
    } else if all_present && mirror.optimal_count() == backends.len() {
        "optimal"
    } else {
        "degraded"
    }
}

/// The status document (see the README for its fields).
pub fn status(mirror: &Mirror, mnt: &Path) -> Value {
    let sb = mirror.superblock();
    let mut members = Vec::new();
    for b in mirror.backends() {
        let c = &b.counters;
        let (state, reason, recovery) = match b.state() {
            BackendState::Optimal => ("optimal", String::new(), Value::Null),
            BackendState::Degraded(r) => ("degraded", r, Value::Null),
            BackendState::Recovering(p) => (
                "recovering",
                String::new(),
                json!({
                    "objects_done": p.objects_done.load(Ordering::Relaxed),
                    "objects_total": p.objects_total.load(Ordering::Relaxed),
                    "bytes_done": p.bytes_done.load(Ordering::Relaxed),
                    "bytes_total": p.bytes_total.load(Ordering::Relaxed),
                    "rate_bytes_per_sec": p.rate(),
                    "full_compare": p.full,
                }),
            ),
        };
        let last = b.last_recovery.lock().clone().map_or(Value::Null, |r| {
            json!({
                "objects": r.objects,
                "bytes": r.bytes,
                "seconds": r.seconds,
                "full_compare": r.full_compare,
                "error": r.error,
            })
        });
        members.push(json!({
            "id": b.id,
            "location": b.location,
            "state": state,
            "reason": reason,
            "recovery": recovery,
            "last_recovery": last,
            "reads": c.reads.load(Ordering::Relaxed),
            "writes": c.writes.load(Ordering::Relaxed),
            "read_errors": c.read_errors.load(Ordering::Relaxed),
            "write_errors": c.write_errors.load(Ordering::Relaxed),
            "checksum_errors": c.checksum_errors.load(Ordering::Relaxed),
            "read_latency_us": b.latency_us(),
        }));
    }
    let present: Vec<u32> = mirror.backends().iter().map(|b| b.id).collect();
    for m in sb.members.iter().filter(|m| !present.contains(&m.id)) {
        let reason = match m.degraded.as_str() {
            "" => "not given at mount",
            r => r,
        };
        members.push(json!({
            "id": m.id,
            "location": m.location,
            "state": "missing",
            "reason": reason,
            "recovery": Value::Null,
            "last_recovery": Value::Null,
            "reads": 0, "writes": 0, "read_errors": 0, "write_errors": 0, "checksum_errors": 0,
            "read_latency_us": 0,
        }));
    }
    let scrub = mirror.scrub_progress().map_or(Value::Null, |p| {
        json!({
            "running": p.running.load(Ordering::Relaxed),
            "objects_done": p.objects_done.load(Ordering::Relaxed),
            "objects_total": p.objects_total.load(Ordering::Relaxed),
            "bytes_done": p.bytes_done.load(Ordering::Relaxed),
            "rate_bytes_per_sec": p.rate(),
            "repaired": p.repaired.load(Ordering::Relaxed),
            "unrecoverable": p.unrecoverable.load(Ordering::Relaxed),
            "errors": p.errors.load(Ordering::Relaxed),
            "seconds": p.started.elapsed().as_secs_f64(),
        })
    });
    json!({
        "mountpoint": mnt.display().to_string(),
        "scrub": scrub,
        "fs_uuid": sb.fs_uuid,
        "state": array_state(mirror),
        "generation": sb.generation,
        "min_optimal": mirror.options().min_optimal,
        "read_only": mirror.read_only(),
        "backends": members,
    })
}

/// Why a request could not be answered.
pub enum ClientError {
    /// Nothing answers for this path: it is not a mirrorfs mount.
    NotAMount(String),
    /// The mount refused the request.
    Refused(String),
}

/// Sends one request to the mount at `mountpoint` and returns its answer.
pub fn request(mountpoint: &Path, req: &Value) -> Result<Value, ClientError> {
    let not_mount =
        || ClientError::NotAMount(format!("{} is not a mirrorfs mount", mountpoint.display()));
    let canonical = std::fs::canonicalize(mountpoint).map_err(|_| not_mount())?;
    let mut conn = UnixStream::connect(socket_path(&canonical)).map_err(|_| not_mount())?;
    let mut line = req.to_string();
    line.push('\n');
    conn.write_all(line.as_bytes())
        .map_err(|e| ClientError::Refused(e.to_string()))?;
    let mut answer = String::new();
    BufReader::new(&conn)
        .read_line(&mut answer)
        .map_err(|e| ClientError::Refused(format!("no answer from the mount: {e}")))?;
    let v: Value = serde_json::from_str(&answer)
        .map_err(|e| ClientError::Refused(format!("bad answer from the mount: {e}")))?;
    if v["ok"] == json!(true) {
        Ok(v)
    } else {
        Err(ClientError::Refused(
            v["error"].as_str().unwrap_or("refused").to_string(),
        ))
    }
}
