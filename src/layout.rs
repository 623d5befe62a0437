//! The object layout: which objects a filesystem is made of, their keys and encodings.
//!
//! Every backend holds the same objects (except that each superblock names its own member):
//!
//! | key                                   | content                                        |
//! |---------------------------------------|------------------------------------------------|
//! | `superblock`                          | [`Superblock`], JSON                           |
//! | `i/<ino % 256>/<ino>`                 | [`InodeRecord`]: attributes, xattrs, symlink   |
//! | `d/<parent % 256>/<parent>/<hash>`    | [`DirentRecord`]: one entry of a directory     |
//! | `b/<ino % 256>/<ino>.<index>`         | bytes `[index * block_size, ...)` of a file    |
//! | `missed/<member>`                     | keys a degraded member missed, one per line    |
//!
//! Numbers are lower-case hex. `<hash>` is the first 128 bits of the BLAKE3 hash of the entry
//! name, so that names of up to 255 arbitrary bytes become short, fixed-size keys; the name
//! itself is stored inside the entry.
//!
//! Consequences the design relies on:
//! - Creating, removing or renaming an entry touches the entry objects, the inode and the
//!   parent inodes: a constant number of objects, whatever the size of the directory.
//! - File data is keyed by inode number, never by name, so no rename copies data.
//! - A data block is written in place with a ranged write, so a 4 KiB write into a large
//!   file changes about 4 KiB on a local directory store. A block that does not exist, or
//!   bytes past its end, read as zeros: this is how holes are represented.
//! - Every block of a file has an index below the inode's `blocks_hw` (high-water mark), which
//!   is written before any block at or above it. Removing or truncating a file therefore
//!   knows which block keys may exist without listing anything, even after a crash.

use serde::{Deserialize, Serialize};

/// Version of this layout, recorded in every superblock. Version 2 added checksums
/// ([`Superblock::checksums`]); version 1 filesystems are read and written without them.
pub const FORMAT_VERSION: u32 = 2;

/// The oldest layout version this build still mounts.
pub const OLDEST_FORMAT_VERSION: u32 = 1;

/// Magic string identifying a mirrorfs superblock.
pub const MAGIC: &str = "mirrorfs";

/// Key of the superblock object.
pub const SUPERBLOCK_KEY: &str = "superblock";

/// Inode number of the root directory (fixed by FUSE).
pub const ROOT_INO: u64 = 1;

/// Default size of a data block.
pub const DEFAULT_BLOCK_SIZE: u64 = 1 << 20;

/// Key of an inode object.
pub fn inode_key(ino: u64) -> String {
    format!("i/{:02x}/{:016x}", ino & 0xff, ino)
}

/// Prefix under which all entries of directory `parent` live.
pub fn dir_prefix(parent: u64) -> String {
    format!("d/{:02x}/{:016x}/", parent & 0xff, parent)
}

/// Key of the entry `name` in directory `parent`.
pub fn dirent_key(parent: u64, name: &[u8]) -> String {
    let hash = blake3::hash(name);
    let short = &hash.as_bytes()[..16];
    let mut key = dir_prefix(parent);
    for b in short {
        key.push_str(&format!("{b:02x}"));
    }
    key
}

/// Key of the log of keys that member `id` missed while it was not optimal. The log is a
/// superset: every key a mutation may have touched is appended before the mutation runs.
pub fn missed_key(id: u32) -> String {
    format!("missed/{id:08x}")
}

/// Key of the crash journal (see [`crate::mirror::journal`]).
pub const JOURNAL_KEY: &str = "journal";

/// How an object is encoded, which decides how it is checksummed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// A data block: a header of per-page checksums, then the bytes.
    Block,
    /// An inode or directory entry record: a checksum prefix, then the JSON.
    Record,
    /// Stored as given (superblock, logs, journal).
    Raw,
}

/// The encoding of the object at `key`.
pub fn key_kind(key: &str) -> KeyKind {
    if key.starts_with("b/") {
        KeyKind::Block
    } else if key.starts_with("i/") || key.starts_with("d/") {
        KeyKind::Record
    } else {
        KeyKind::Raw
    }
}

/// The inode an inode or data block key belongs to.
pub fn key_ino(key: &str) -> Option<u64> {
    let rest = key.strip_prefix("i/").or_else(|| key.strip_prefix("b/"))?;
    let name = rest.split('/').nth(1)?;
    let hex = name.split('.').next()?;
    u64::from_str_radix(hex, 16).ok()
}

/// The prefix of every data block key of file `ino`.
pub fn block_prefix(ino: u64) -> String {
    format!("b/{:02x}/{:016x}.", ino & 0xff, ino)
}

/// Key of data block `index` of file `ino`.
pub fn block_key(ino: u64, index: u64) -> String {
    format!("b/{:02x}/{:016x}.{:08x}", ino & 0xff, ino, index)
}

/// The kinds of inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl Kind {
    /// The `S_IFMT` bits of this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            Kind::File => libc::S_IFREG,
            Kind::Dir => libc::S_IFDIR,
            Kind::Symlink => libc::S_IFLNK,
            Kind::Fifo => libc::S_IFIFO,
            Kind::Socket => libc::S_IFSOCK,
            Kind::CharDev => libc::S_IFCHR,
            Kind::BlockDev => libc::S_IFBLK,
        }
    }

    /// The kind named by the `S_IFMT` bits of `mode`.
    pub fn from_mode(mode: u32) -> Option<Kind> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => Kind::File,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDev,
            libc::S_IFBLK => Kind::BlockDev,
            _ => return None,
        })
    }
}

/// A point in time, as seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Timestamp {
    pub secs: i64,
    pub nsecs: u32,
}

impl Timestamp {
    /// The current time.
    pub fn now() -> Timestamp {
        Timestamp::from_system(std::time::SystemTime::now())
    }

    /// Converts from `SystemTime`, including times before the epoch.
    pub fn from_system(t: std::time::SystemTime) -> Timestamp {
        match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => Timestamp {
                secs: d.as_secs() as i64,
                nsecs: d.subsec_nanos(),
            },
            Err(e) => {
                let d = e.duration();
                let mut secs = -(d.as_secs() as i64);
                let mut nsecs = d.subsec_nanos();
                if nsecs > 0 {
                    secs -= 1;
                    nsecs = 1_000_000_000 - nsecs;
                }
                Timestamp { secs, nsecs }
            }
        }
    }

    /// Converts a time received from fuser in a request. fuser 0.18 turns a kernel time
    /// before the epoch, `-s + n` (seconds, nanoseconds), into `epoch - (s + n)`; this undoes
    /// that so times before 1970 are stored exactly.
    pub fn from_fuser_request(t: std::time::SystemTime) -> Timestamp {
        match std::time::UNIX_EPOCH.duration_since(t) {
            Ok(d) if !d.is_zero() => Timestamp {
                secs: -(d.as_secs() as i64),
                nsecs: d.subsec_nanos(),
            },
            _ => Timestamp::from_system(t),
        }
    }

    /// Converts to `SystemTime`.
    pub fn to_system(self) -> std::time::SystemTime {
        let base = std::time::UNIX_EPOCH;
        if self.secs >= 0 {
            base + std::time::Duration::new(self.secs as u64, self.nsecs)
        } else {
            base - std::time::Duration::from_secs(self.secs.unsigned_abs())
                + std::time::Duration::from_nanos(self.nsecs as u64)
        }
    }
}

/// One inode, as stored in its object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InodeRecord {
    pub ino: u64,
    pub kind: Kind,
    /// Permission bits including set-uid, set-gid and sticky (`0o7777`).
    pub perm: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u32,
    pub rdev: u32,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub crtime: Timestamp,
    /// For a directory, the directory that holds it (the root is its own parent).
    #[serde(default)]
    pub parent: u64,
    /// Every data block of a file has an index below this (see the module docs).
    #[serde(default)]
    pub blocks_hw: u64,
    /// Target of a symbolic link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Vec<u8>>,
    /// Extended attributes, sorted by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl InodeRecord {
    /// A new inode with all times set to now.
    pub fn new(ino: u64, kind: Kind, perm: u32, uid: u32, gid: u32) -> InodeRecord {
        let now = Timestamp::now();
        InodeRecord {
            ino,
            kind,
            perm: perm & 0o7777,
            uid,
            gid,
            size: 0,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            rdev: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            parent: 0,
            blocks_hw: 0,
            target: None,
            xattrs: Vec::new(),
        }
    }

    /// Serialises the record for storage.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("inode serialises")
    }

    /// Parses a stored record.
    pub fn decode(data: &[u8]) -> Result<InodeRecord, serde_json::Error> {
        serde_json::from_slice(data)
    }
}

/// One directory entry, as stored in its object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirentRecord {
    pub name: Vec<u8>,
    pub ino: u64,
    pub kind: Kind,
}

impl DirentRecord {
    /// Serialises the record for storage.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("dirent serialises")
    }

    /// Parses a stored record.
    pub fn decode(data: &[u8]) -> Result<DirentRecord, serde_json::Error> {
        serde_json::from_slice(data)
    }
}

/// One member of the mirror as recorded in the superblocks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub id: u32,
    /// Where the member was last seen (a path or URL), for messages only.
    pub location: String,
    /// Empty when the member was optimal at the last superblock write; otherwise why not.
    #[serde(default)]
    pub degraded: String,
    /// While the member is not optimal: the generation from which every key it misses is
    /// listed in its missed-key log (`missed/<id>`); 0 when there is no such log.
    #[serde(default)]
    pub missed_since: u64,
    /// A recovery of this member was under way; the next mount resumes it.
    #[serde(default)]
    pub recovering: bool,
}

/// The self-description every backend carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Superblock {
    pub magic: String,
    pub format_version: u32,
    pub fs_uuid: String,
    /// Which member of the mirror this backend is.
    pub member_id: u32,
    /// Bumped every time the set of optimal members changes; identical on every optimal
    /// member. A backend with a lower generation missed writes.
    pub generation: u64,
    /// The member table as of `generation`.
    pub members: Vec<MemberRecord>,
    /// True when the filesystem was unmounted cleanly.
    pub clean: bool,
    /// Inode numbers below this may be in use; new ones are reserved above it.
    pub next_ino: u64,
    pub block_size: u64,
    /// Every object carries a checksum (see [`crate::store::ChecksumStore`]).
    #[serde(default)]
    pub checksums: bool,
    /// The boot of the machine that last mounted the filesystem read-write (from
    /// `/proc/sys/kernel/random/boot_id`): after an unclean stop, the same boot means the
    /// mount process died but the page cache, and so the crash journal, survived.
    #[serde(default)]
    pub boot_id: String,
}

impl Superblock {
    /// Serialises the superblock for storage.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("superblock serialises")
    }

    /// Parses a stored superblock, checking its magic and version.
    pub fn decode(data: &[u8]) -> Result<Superblock, String> {
        let sb: Superblock =
            serde_json::from_slice(data).map_err(|e| format!("unreadable superblock: {e}"))?;
        if sb.magic != MAGIC {
            return Err("not a mirrorfs superblock".into());
        }
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&sb.format_version) {
            return Err(format!(
                "format version {} is not supported (this build reads \
                 {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION})",
                sb.format_version
            ));
        }
        if sb.format_version < 2 && sb.checksums {
            return Err("format version 1 cannot have checksums".into());
        }
        Ok(sb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_short_and_distinct() {
        let long = vec![0xffu8; 255];
        let k = dirent_key(7, &long);
        assert!(k.len() < 80, "{k}");
        assert_ne!(dirent_key(7, b"a"), dirent_key(7, b"b"));
        assert!(k.starts_with(&dir_prefix(7)));
        assert_ne!(block_key(3, 1), block_key(3, 2));
        assert_eq!(key_ino(&block_key(0x1234, 7)), Some(0x1234));
        assert!(block_key(0x1234, 7).starts_with(&block_prefix(0x1234)));
        assert_eq!(key_ino(&inode_key(0x99)), Some(0x99));
        assert_eq!(key_ino(&dirent_key(3, b"x")), None);
    }

    #[test]
    fn timestamps_round_trip_before_epoch() {
        let t = Timestamp {
            secs: -5,
            nsecs: 250,
        };
        assert_eq!(Timestamp::from_system(t.to_system()), t);
        let fuser_style = std::time::UNIX_EPOCH - std::time::Duration::new(5, 250);
        let expected = Timestamp {
            secs: -5,
            nsecs: 250,
        };
        assert_eq!(Timestamp::from_fuser_request(fuser_style), expected);
        let t = Timestamp {
            secs: 1_700_000_000,
            nsecs: 999_999_999,
        };
        assert_eq!(Timestamp::from_system(t.to_system()), t);
    }
}
