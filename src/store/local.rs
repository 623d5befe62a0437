//! A backend that keeps each object as a file under a local directory.
//!
//! Key `a/b/c` is the file `ROOT/a/b/c`; parent directories are created on demand. Whole-object
//! puts go through a temporary file in `ROOT/.tmp` and a rename, so they are atomic. Ranged
//! writes go straight to the object file with `pwrite`, so a 4 KiB write costs about 4 KiB of
//! I/O whatever the object size.
//!
//! Durability: every path changed since the last [`Store::sync`] (and the directory holding
//! it) is remembered; `sync` fsyncs exactly those. Names starting with `.` at the root are
//! private to this store (`.tmp`, `.lock`) and never appear in listings.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use super::{LockIntent, Store, StoreError, StoreResult};

/// Objects stored as files below a local directory.
pub struct LocalStore {
    root: PathBuf,
    /// Device and inode of the root directory when the store was opened.
    identity: (u64, u64),
    tmp: PathBuf,
    tmp_seq: AtomicU64,
    /// Files and directories changed since the last sync.
    dirty: Mutex<HashSet<PathBuf>>,
}

/// Objects up to this size are rewritten in place (see [`Store::rewrite`]).
const PAGE: usize = 4096;

/// How long `lock` waits for another mount of the backend to go away.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Holds the `flock` on `ROOT/.lock` for as long as it lives.
struct LockGuard(#[allow(dead_code)] File);

impl LocalStore {
    /// Opens the store rooted at `root`, which must be an existing directory.
    pub fn open(root: &Path) -> io::Result<LocalStore> {
        let meta = fs::metadata(root)?;
        if !meta.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                "not a directory",
            ));
        }
        let root = root.canonicalize()?;
        let tmp = root.join(".tmp");
        Ok(LocalStore {
            identity: (meta.dev(), meta.ino()),
            root,
            tmp,
            tmp_seq: AtomicU64::new(0),
            dirty: Mutex::new(HashSet::new()),
        })
    }

    /// The canonical root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> PathBuf {
        debug_assert!(
            !key.starts_with('.') && !key.contains(".."),
            "bad key {key}"
        );
        self.root.join(key)
    }

    fn mark_dirty(&self, path: &Path) {
        let mut dirty = self.dirty.lock();
        dirty.insert(path.to_path_buf());
        if let Some(parent) = path.parent() {
            dirty.insert(parent.to_path_buf());
        }
    }

    /// Creates the parent directories of `path`, remembering new ones for the next sync.
    fn make_parents(&self, path: &Path) -> io::Result<()> {
        let parent = path.parent().expect("object path has a parent");
        if parent.is_dir() {
            return Ok(());
        }
        let mut missing = Vec::new();
        let mut dir = parent;
        while !dir.is_dir() {
            if dir == self.root {
                // Never recreate a backend directory that disappeared: that would silently
                // start a new, empty backend in its place.
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("backend directory {} is gone", self.root.display()),
                ));
            }
            missing.push(dir.to_path_buf());
            dir = dir.parent().expect("root exists");
        }
        for dir in missing.into_iter().rev() {
            match fs::create_dir(&dir) {
                Ok(()) => self.mark_dirty(&dir),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn open_for_write(&self, path: &Path, truncate: bool) -> io::Result<File> {
        let open = || {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(truncate)
                .mode(0o600)
                .open(path)
        };
        match open() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.make_parents(path)?;
                open()
            }
            other => other,
        }
    }

    fn tmp_path(&self) -> PathBuf {
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.tmp.join(format!("{}.{}", std::process::id(), seq))
    }

    fn list_dir(&self, dir: &Path, key_dir: &str, name_prefix: &str, out: &mut Vec<String>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if key_dir.is_empty() && name.starts_with('.') {
                continue;
            }
            if !name.starts_with(name_prefix) {
                continue;
            }
            let key = format!("{key_dir}{name}");
            match entry.file_type() {
                Ok(t) if t.is_dir() => {
                    self.list_dir(&entry.path(), &format!("{key}/"), "", out);
                }
                Ok(_) => out.push(key),
                Err(_) => {}
            }
        }
    }
}

impl Store for LocalStore {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn get(&self, key: &str) -> StoreResult<Vec<u8>> {
        fs::read(self.path(key)).map_err(StoreError::from_io)
    }

    fn size(&self, key: &str) -> StoreResult<u64> {
        fs::metadata(self.path(key))
            .map(|m| m.len())
            .map_err(StoreError::from_io)
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> StoreResult<Vec<u8>> {
        let file = File::open(self.path(key)).map_err(StoreError::from_io)?;
        let mut buf = vec![0u8; len];
        let mut done = 0;
        while done < len {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(StoreError::from_io(e)),
            }
        }
        buf.truncate(done);
        Ok(buf)
    }

    fn put(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        let path = self.path(key);
        let tmp = self.tmp_path();
        let write = || -> io::Result<()> {
            let mut f = match File::create(&tmp) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir_all(&self.tmp)?;
                    File::create(&tmp)?
                }
                other => other?,
            };
            // No fsync here: the content reaches stable storage at the next `sync`, which
            // fsyncs this object and its directory. A process crash sees old or new content;
            // a power loss before `sync` may lose the put (never a durable state).
            f.write_all(data)
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::from_io(e));
        }
        let renamed = match fs::rename(&tmp, &path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => self
                .make_parents(&path)
                .and_then(|()| fs::rename(&tmp, &path)),
            other => other,
        };
        if let Err(e) = renamed {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::from_io(e));
        }
        self.mark_dirty(&path);
        Ok(())
    }

    fn create(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        // Written in place: no temporary file and no rename, which halves the directory
        // operations of creating a file.
        let path = self.path(key);
        let file = self
            .open_for_write(&path, true)
            .map_err(StoreError::from_io)?;
        file.write_all_at(data, 0).map_err(StoreError::from_io)?;
        self.mark_dirty(&path);
        Ok(())
    }

    fn rewrite(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        if data.len() > PAGE {
            return self.put(key, data);
        }
        let path = self.path(key);
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return self.put(key, data),
            Err(e) => return Err(StoreError::from_io(e)),
        };
        let old_len = file.metadata().map_err(StoreError::from_io)?.len() as usize;
        if old_len > PAGE {
            return self.put(key, data);
        }
        // One write of at most one page at offset 0: a crash of this process sees the old
        // or the new content, never a mix. Padding covers any longer old content.
        let mut page = data.to_vec();
        page.resize(old_len.max(data.len()), b' ');
        let n = file.write_at(&page, 0).map_err(StoreError::from_io)?;
        if n != page.len() {
            return Err(StoreError::Io(io::Error::other(
                "short write of a one-page object",
            )));
        }
        self.mark_dirty(&path);
        Ok(())
    }

    fn write_at(&self, key: &str, offset: u64, data: &[u8]) -> StoreResult<()> {
        let path = self.path(key);
        let file = self
            .open_for_write(&path, false)
            .map_err(StoreError::from_io)?;
        file.write_all_at(data, offset)
            .map_err(StoreError::from_io)?;
        self.mark_dirty(&path);
        Ok(())
    }

    fn truncate(&self, key: &str, len: u64) -> StoreResult<()> {
        let path = self.path(key);
        let file = self
            .open_for_write(&path, false)
            .map_err(StoreError::from_io)?;
        file.set_len(len).map_err(StoreError::from_io)?;
        self.mark_dirty(&path);
        Ok(())
    }

    fn delete(&self, key: &str) -> StoreResult<()> {
        let path = self.path(key);
        fs::remove_file(&path).map_err(StoreError::from_io)?;
        let mut dirty = self.dirty.lock();
        dirty.remove(&path);
        if let Some(parent) = path.parent() {
            // Per-file and per-directory folders (keys with three slashes) are removed when
            // they become empty, so deleted files leave nothing behind.
            if key.matches('/').count() >= 3 && fs::remove_dir(parent).is_ok() {
                dirty.remove(parent);
                if let Some(grand) = parent.parent() {
                    dirty.insert(grand.to_path_buf());
                }
            } else {
                dirty.insert(parent.to_path_buf());
            }
        }
        Ok(())
    }

    fn list(&self, prefix: &str) -> StoreResult<Vec<String>> {
        let (key_dir, name_prefix) = match prefix.rfind('/') {
            Some(i) => (&prefix[..=i], &prefix[i + 1..]),
            None => ("", prefix),
        };
        let mut out = Vec::new();
        let dir = if key_dir.is_empty() {
            self.root.clone()
        } else {
            self.path(key_dir)
        };
        self.list_dir(&dir, key_dir, name_prefix, &mut out);
        Ok(out)
    }

    fn sync(&self) -> StoreResult<()> {
        let dirty: Vec<PathBuf> = self.dirty.lock().drain().collect();
        for path in &dirty {
            match File::open(path) {
                Ok(f) => f.sync_all().map_err(StoreError::from_io)?,
                // Removed since it was written: its directory is in the set too.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::from_io(e)),
            }
        }
        Ok(())
    }

    fn ranged_writes(&self) -> bool {
        true
    }

    fn lock(&self, _intent: LockIntent) -> StoreResult<Option<Box<dyn Send + Sync>>> {
        // An flock changes nothing on disk, so readers take it too: a read-only mount and a
        // read-write one of the same directory exclude each other.
        // Opened read-only (flock does not need more), so that a mount holds no file of the
        // backend open for writing and its filesystem can be remounted read-only under it.
        let path = self.root.join(".lock");
        if !path.exists() {
            match File::create(&path) {
                Ok(_) => {}
                // A read-only backend cannot be shared by a writer either: go on unlocked.
                Err(e) if e.raw_os_error() == Some(libc::EROFS) => return Ok(None),
                Err(e) => return Err(StoreError::from_io(e)),
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .open(&path)
            .map_err(StoreError::from_io)?;
        // A mount that was just unmounted may still be finishing (syncing, exiting): wait a
        // little before calling the backend busy, so that unmount-then-mount just works.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            // SAFETY: flock on a valid, open file descriptor owned by `file`.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc == 0 {
                return Ok(Some(Box::new(LockGuard(file))));
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(StoreError::Io(err));
            }
            if std::time::Instant::now() >= deadline {
                return Err(StoreError::Io(io::Error::new(
                    io::ErrorKind::ResourceBusy,
                    "backend is in use by another mirrorfs mount",
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    fn check(&self) -> Result<(), String> {
        match fs::metadata(&self.root) {
            Ok(m) if (m.dev(), m.ino()) == self.identity => Ok(()),
            Ok(_) => Err(format!(
                "backend directory {} was replaced or its disk unmounted",
                self.root.display()
            )),
            Err(e) => Err(format!("backend directory {}: {e}", self.root.display())),
        }
    }

    fn space(&self) -> Option<(u64, u64)> {
        let path = std::ffi::CString::new(self.root.as_os_str().as_encoded_bytes()).ok()?;
        // SAFETY: statvfs writes into the zeroed struct we pass; the path is NUL-terminated.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: the path is NUL-terminated and `st` is a valid statvfs to fill.
        let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
        if rc != 0 {
            return None;
        }
        let frsize = st.f_frsize as u64;
        Some((st.f_blocks as u64 * frsize, st.f_bavail as u64 * frsize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_range_write_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        s.put("a/b/c", b"hello").unwrap();
        assert_eq!(s.get("a/b/c").unwrap(), b"hello");
        s.write_at("a/b/c", 7, b"xy").unwrap();
        assert_eq!(s.get("a/b/c").unwrap(), b"hello\0\0xy");
        assert_eq!(s.get_range("a/b/c", 1, 3).unwrap(), b"ell");
        assert_eq!(s.get_range("a/b/c", 8, 10).unwrap(), b"y");
        s.write_at("z/q", 2, b"!").unwrap();
        let mut keys = s.list("a/").unwrap();
        keys.sort();
        assert_eq!(keys, vec!["a/b/c".to_string()]);
        let mut all = s.list("").unwrap();
        all.sort();
        assert_eq!(all, vec!["a/b/c".to_string(), "z/q".to_string()]);
        s.truncate("a/b/c", 2).unwrap();
        assert_eq!(s.get("a/b/c").unwrap(), b"he");
        s.sync().unwrap();
        s.delete("a/b/c").unwrap();
        assert!(matches!(s.get("a/b/c"), Err(StoreError::NotFound)));
        assert!(matches!(s.delete("a/b/c"), Err(StoreError::NotFound)));
    }

    #[test]
    fn a_replaced_or_vanished_root_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("backend");
        fs::create_dir(&root).unwrap();
        let s = LocalStore::open(&root).unwrap();
        s.put("a/b", b"x").unwrap();
        assert!(s.check().is_ok());

        fs::rename(&root, dir.path().join("moved")).unwrap();
        assert!(s.check().is_err());
        assert!(
            s.write_at("c/d", 0, b"y").is_err(),
            "the root must not be recreated"
        );
        assert!(!root.exists());

        fs::create_dir(&root).unwrap();
        let err = s.check().unwrap_err();
        assert!(err.contains("replaced"), "{err}");
    }

    #[test]
    fn lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let a = LocalStore::open(dir.path()).unwrap();
        let b = LocalStore::open(dir.path()).unwrap();
        let guard = a.lock(LockIntent::Write).unwrap();
        assert!(b.lock(LockIntent::Write).is_err());
        assert!(b.lock(LockIntent::Read).is_err());
        drop(guard);
        assert!(b.lock(LockIntent::Write).is_ok());
    }
}
