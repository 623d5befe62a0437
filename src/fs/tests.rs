//! fs-layer tests without a kernel, over in-memory stores.

use std::sync::Arc;

use super::*;
use crate::mirror::{format, MirrorOptions};
use crate::store::{FaultStore, MemoryStore, Store};

const ME: Caller = Caller {
    uid: 1000,
    gid: 1000,
};

struct Rig {
    mem: Vec<Arc<MemoryStore>>,
    counters: Vec<Arc<FaultStore>>,
}

impl Rig {
    fn new(n: usize) -> Rig {
        let mem: Vec<Arc<MemoryStore>> = (0..n)
            .map(|i| Arc::new(MemoryStore::new(&format!("m{i}"))))
            .collect();
        let counters: Vec<Arc<FaultStore>> = mem
            .iter()
            .map(|m| Arc::new(FaultStore::new(Arc::clone(m) as Arc<dyn Store>)))
            .collect();
        let rig = Rig { mem, counters };
        format(&rig.stores(), &Fs::root_batch(0, 0)).unwrap();
        rig
    }

    fn stores(&self) -> Vec<(String, Arc<dyn Store>)> {
        let named = self.counters.iter().enumerate();
        named
            .map(|(i, s)| (format!("m{i}"), Arc::clone(s) as Arc<dyn Store>))
            .collect()
    }

    fn fs(&self) -> Fs {
        let mirror = Mirror::open(self.stores(), MirrorOptions::default()).unwrap();
        Fs::new(Arc::new(mirror)).unwrap()
    }

    fn calls(&self) -> u64 {
        self.counters[0].calls()
    }

    /// Every backend holds the same objects (superblocks aside, which name their member).
    fn assert_identical(&self) {
        let strip = |m: &MemoryStore| {
            let mut snap = m.snapshot();
            snap.remove(crate::layout::SUPERBLOCK_KEY);
            snap
        };
        let first = strip(&self.mem[0]);
        for m in &self.mem[1..] {
            assert!(strip(m) == first, "backends differ");
        }
    }
}

fn write_file(fs: &Fs, parent: u64, name: &str, data: &[u8]) -> u64 {
    let (rec, fh) = fs
        .create(ME, parent, name.as_bytes(), 0o644, libc::O_RDWR)
        .unwrap();
    fs.write(rec.ino, fh, 0, data).unwrap();
    fs.flush(rec.ino).unwrap();
    fs.release(fh).unwrap();
    rec.ino
}

fn read_all(fs: &Fs, ino: u64) -> Vec<u8> {
    let size = fs.getattr(ino).unwrap().size;
    fs.read(ino, 0, size as u32 + 10).unwrap()
}

#[test]
fn files_and_directories_persist_across_remount() {
    let rig = Rig::new(2);
    {
        let fs = rig.fs();
        let d = fs.mkdir(ME, ROOT_INO, b"dir", 0o750).unwrap();
        let ino = write_file(&fs, d.ino, "f", b"hello world");
        fs.link(ino, ROOT_INO, b"hard").unwrap();
        fs.symlink(ME, ROOT_INO, b"sym", b"dir/f").unwrap();
        fs.setxattr(ino, b"user.k", b"v", false, false).unwrap();
        fs.mknod(ME, ROOT_INO, b"fifo", libc::S_IFIFO | 0o600, 0)
            .unwrap();
        fs.shutdown().unwrap();
    }
    rig.assert_identical();
    let fs = rig.fs();
    let d = fs.lookup(ROOT_INO, b"dir").unwrap();
    assert_eq!(
        (d.kind, d.perm, d.uid, d.nlink),
        (Kind::Dir, 0o750, 1000, 2)
    );
    let f = fs.lookup(d.ino, b"f").unwrap();
    assert_eq!(read_all(&fs, f.ino), b"hello world");
    assert_eq!(f.nlink, 2);
    assert_eq!(fs.lookup(ROOT_INO, b"hard").unwrap().ino, f.ino);
    let s = fs.lookup(ROOT_INO, b"sym").unwrap();
    assert_eq!(fs.readlink(s.ino).unwrap(), b"dir/f");
    assert_eq!(fs.getxattr(f.ino, b"user.k").unwrap(), b"v");
    assert_eq!(fs.lookup(ROOT_INO, b"fifo").unwrap().kind, Kind::Fifo);
    assert_eq!(fs.getattr(ROOT_INO).unwrap().nlink, 3);
}

#[test]
fn holes_and_truncation_read_as_zeros() {
    let rig = Rig::new(2);
    let fs = rig.fs();
    let bs = fs.block_size;
    let (rec, fh) = fs
        .create(ME, ROOT_INO, b"sparse", 0o644, libc::O_RDWR)
        .unwrap();
    fs.write(rec.ino, fh, 3 * bs + 10, b"tail").unwrap();
    assert_eq!(fs.getattr(rec.ino).unwrap().size, 3 * bs + 14);
    assert_eq!(fs.read(rec.ino, bs, 100).unwrap(), vec![0u8; 100]);
    assert_eq!(fs.read(rec.ino, 3 * bs + 8, 100).unwrap(), b"\0\0tail");

    fs.write(rec.ino, fh, 0, &[7u8; 100]).unwrap();
    fs.setattr(
        rec.ino,
        SetAttr {
            size: Some(50),
            ..Default::default()
        },
    )
    .unwrap();
    fs.setattr(
        rec.ino,
        SetAttr {
            size: Some(200),
            ..Default::default()
        },
    )
    .unwrap();
    let data = fs.read(rec.ino, 0, 300).unwrap();
    assert_eq!(data.len(), 200);
    assert!(data[..50].iter().all(|&b| b == 7) && data[50..].iter().all(|&b| b == 0));
    fs.release(fh).unwrap();
    rig.assert_identical();
}

#[test]
fn stale_bytes_past_the_end_never_reappear() {
    // As after a crash: a block holds bytes past the recorded size. Extending the file
    // must show zeros there, not the old bytes.
    let rig = Rig::new(1);
    let fs = rig.fs();
    let ino = write_file(&fs, ROOT_INO, "f", b"abc");
    for m in &rig.mem {
        let m = crate::store::ChecksumStore::new(Arc::clone(m) as _, fs.block_size);
        m.write_at(&block_key(ino, 0), 3, b"STALE").unwrap();
        m.put(&block_key(ino, 5), b"STALE").unwrap();
    }
    let fh = fs.open(ino, libc::O_RDWR).unwrap();
    fs.write(ino, fh, 6 * fs.block_size, b"z").unwrap();
    let data = fs.read(ino, 0, 16).unwrap();
    assert_eq!(&data[..3], b"abc");
    assert!(data[3..].iter().all(|&b| b == 0), "{data:?}");
    assert_eq!(fs.read(ino, 5 * fs.block_size, 5).unwrap(), vec![0u8; 5]);
    fs.release(fh).unwrap();
}

#[test]
fn rename_variants() {
    let rig = Rig::new(2);
    let fs = rig.fs();
    let a = write_file(&fs, ROOT_INO, "a", b"A");
    let b = write_file(&fs, ROOT_INO, "b", b"B");
    let no = RenameFlags {
        noreplace: true,
        exchange: false,
    };
    let ex = RenameFlags {
        noreplace: false,
        exchange: true,
    };
    assert!(matches!(
        fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", no),
        Err(FsError::Exists)
    ));
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", ex).unwrap();
    assert_eq!(fs.lookup(ROOT_INO, b"a").unwrap().ino, b);
    assert_eq!(fs.lookup(ROOT_INO, b"b").unwrap().ino, a);

    // Replacing a file frees the old one.
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"b", RenameFlags::default())
        .unwrap();
    assert!(matches!(fs.lookup(ROOT_INO, b"a"), Err(FsError::NotFound)));
    assert!(matches!(fs.getattr(a).map(|r| r.nlink), Ok(0)));
    assert!(matches!(
        rig.mem[0].get(&inode_key(a)),
        Err(crate::store::StoreError::NotFound)
    ));

    let d = fs.mkdir(ME, ROOT_INO, b"d", 0o755).unwrap();
    let sub = fs.mkdir(ME, d.ino, b"sub", 0o755).unwrap();
    let plain = RenameFlags::default();
    assert!(matches!(
        fs.rename(ROOT_INO, b"d", sub.ino, b"x", plain),
        Err(FsError::Invalid)
    ));
    let e = fs.mkdir(ME, ROOT_INO, b"e", 0o755).unwrap();
    write_file(&fs, e.ino, "inside", b"");
    assert!(matches!(
        fs.rename(ROOT_INO, b"d", ROOT_INO, b"e", plain),
        Err(FsError::NotEmpty)
    ));
    assert!(matches!(
        fs.rename(ROOT_INO, b"b", ROOT_INO, b"d", plain),
        Err(FsError::IsDir)
    ));

    // Moving a directory moves its link from one parent to the other.
    fs.rename(d.ino, b"sub", e.ino, b"sub2", plain).unwrap();
    assert_eq!(fs.getattr(d.ino).unwrap().nlink, 2);
    assert_eq!(fs.getattr(e.ino).unwrap().nlink, 3);
    let listing = fs.listing(fs.opendir(sub.ino).unwrap()).unwrap();
    assert_eq!(listing[1].ino, e.ino, "'..' follows the move");
    rig.assert_identical();
}

#[test]
fn unlinked_open_file_lives_until_release() {
    let rig = Rig::new(2);
    let fs = rig.fs();
    let ino = write_file(&fs, ROOT_INO, "f", b"still here");
    let fh = fs.open(ino, libc::O_RDWR).unwrap();
    fs.unlink(ROOT_INO, b"f").unwrap();
    assert_eq!(read_all(&fs, ino), b"still here");
    fs.write(ino, fh, 0, b"STILL").unwrap();
    assert_eq!(read_all(&fs, ino), b"STILL here");
    fs.release(fh).unwrap();
    let left: Vec<String> = rig.mem[0].snapshot().into_keys().collect();
    assert!(
        left.iter().all(|k| !k.contains(&format!("{ino:016x}"))),
        "{left:?}"
    );
}

#[test]
fn directory_rules() {
    let rig = Rig::new(1);
    let fs = rig.fs();
    let d = fs.mkdir(ME, ROOT_INO, b"d", 0o755).unwrap();
    write_file(&fs, d.ino, "f", b"");
    assert!(matches!(fs.rmdir(ROOT_INO, b"d"), Err(FsError::NotEmpty)));
    assert!(matches!(fs.unlink(ROOT_INO, b"d"), Err(FsError::IsDir)));
    assert!(matches!(fs.rmdir(d.ino, b"f"), Err(FsError::NotDir)));
    assert!(matches!(
        fs.mkdir(ME, ROOT_INO, b"d", 0o755),
        Err(FsError::Exists)
    ));
    let long = vec![b'x'; 256];
    assert!(matches!(
        fs.mkdir(ME, ROOT_INO, &long, 0o755),
        Err(FsError::NameTooLong)
    ));
    let odd: Vec<u8> = (1..=255u8).filter(|&b| b != b'/').collect();
    let f = fs.mkdir(ME, ROOT_INO, &odd, 0o755).unwrap();
    assert_eq!(fs.lookup(ROOT_INO, &odd).unwrap().ino, f.ino);
    fs.unlink(d.ino, b"f").unwrap();
    fs.rmdir(ROOT_INO, b"d").unwrap();
    assert_eq!(fs.getattr(ROOT_INO).unwrap().nlink, 3);
}

#[test]
fn xattr_flags() {
    let rig = Rig::new(1);
    let fs = rig.fs();
    let ino = write_file(&fs, ROOT_INO, "f", b"");
    assert!(matches!(fs.getxattr(ino, b"user.a"), Err(FsError::NoAttr)));
    assert!(matches!(
        fs.setxattr(ino, b"user.a", b"1", false, true),
        Err(FsError::NoAttr)
    ));
    fs.setxattr(ino, b"user.a", b"1", true, false).unwrap();
    assert!(matches!(
        fs.setxattr(ino, b"user.a", b"2", true, false),
        Err(FsError::Exists)
    ));
    fs.setxattr(ino, b"user.a", b"2", false, true).unwrap();
    fs.setxattr(ino, b"user.b", b"", false, false).unwrap();
    assert_eq!(fs.listxattr(ino).unwrap(), b"user.a\0user.b\0");
    fs.removexattr(ino, b"user.a").unwrap();
    assert!(matches!(
        fs.removexattr(ino, b"user.a"),
        Err(FsError::NoAttr)
    ));
    assert!(matches!(
        fs.setxattr(ino, b"system.x", b"", false, false),
        Err(FsError::NotSupported)
    ));
}

#[test]
fn namespace_changes_touch_a_constant_number_of_objects() {
    let rig = Rig::new(1);
    let fs = rig.fs();
    let small = fs.mkdir(ME, ROOT_INO, b"small", 0o755).unwrap();
    let big = fs.mkdir(ME, ROOT_INO, b"big", 0o755).unwrap();
    for i in 0..2000 {
        fs.mknod(
            ME,
            big.ino,
            format!("f{i}").as_bytes(),
            libc::S_IFREG | 0o644,
            0,
        )
        .unwrap();
    }
    let cost = |dir: u64| {
        let start = rig.calls();
        let f = fs.mknod(ME, dir, b"new", libc::S_IFREG | 0o644, 0).unwrap();
        fs.rename(dir, b"new", dir, b"renamed", RenameFlags::default())
            .unwrap();
        fs.link(f.ino, dir, b"linked").unwrap();
        fs.unlink(dir, b"renamed").unwrap();
        fs.unlink(dir, b"linked").unwrap();
        rig.calls() - start
    };
    assert_eq!(cost(small.ino), cost(big.ino));
}

#[test]
fn small_write_into_large_file_touches_one_block() {
    let rig = Rig::new(1);
    let fs = rig.fs();
    let (rec, fh) = fs
        .create(ME, ROOT_INO, b"big", 0o644, libc::O_RDWR)
        .unwrap();
    let chunk = vec![1u8; 1 << 20];
    for i in 0..8u64 {
        fs.write(rec.ino, fh, i << 20, &chunk).unwrap();
    }
    let start = rig.calls();
    fs.write(rec.ino, fh, 5 * (1 << 20) + 4096, &[2u8; 4096])
        .unwrap();
    assert_eq!(
        rig.calls() - start,
        4,
        "ranged writes of the data, its checksum and two journal lines, nothing else"
    );
    let data = fs.read(rec.ino, 5 * (1 << 20) + 4095, 4098).unwrap();
    assert_eq!((data[0], data[1], data[4096], data[4097]), (1, 2, 2, 1));
    fs.release(fh).unwrap();
}

#[test]
fn append_handle_writes_at_the_end() {
    let rig = Rig::new(2);
    let fs = rig.fs();
    let ino = write_file(&fs, ROOT_INO, "log", b"one\n");
    let fh = fs.open(ino, libc::O_WRONLY | libc::O_APPEND).unwrap();
    fs.write(ino, fh, 0, b"two\n").unwrap();
    fs.release(fh).unwrap();
    assert_eq!(read_all(&fs, ino), b"one\ntwo\n");
}

#[test]
fn read_only_mirror_refuses_changes() {
    let rig = Rig::new(1);
    {
        let fs = rig.fs();
        write_file(&fs, ROOT_INO, "f", b"x");
        fs.shutdown().unwrap();
    }
    let before = rig.mem[0].snapshot();
    let opts = MirrorOptions {
        read_only: true,
        ..MirrorOptions::default()
    };
    let fs = Fs::new(Arc::new(Mirror::open(rig.stores(), opts).unwrap())).unwrap();
    let f = fs.lookup(ROOT_INO, b"f").unwrap();
    assert_eq!(read_all(&fs, f.ino), b"x");
    assert!(matches!(
        fs.mkdir(ME, ROOT_INO, b"d", 0o755),
        Err(FsError::ReadOnly)
    ));
    assert!(matches!(
        fs.open(f.ino, libc::O_RDWR),
        Err(FsError::ReadOnly)
    ));
    fs.shutdown().unwrap();
    assert!(
        rig.mem[0].snapshot() == before,
        "a read-only mount changed the backend"
    );
}

#[test]
fn stalled_backend_is_left_behind_and_the_filesystem_goes_on() {
    let rig = Rig::new(2);
    let opts = MirrorOptions {
        timeout: std::time::Duration::from_millis(200),
        ..MirrorOptions::default()
    };
    let fs = Fs::new(Arc::new(Mirror::open(rig.stores(), opts).unwrap())).unwrap();
    let stall = crate::store::FaultKind::Stall(std::time::Duration::from_secs(3));
    rig.counters[0].fault_always(None, stall);
    // Every operation completes on the healthy backend; the stalled one is degraded at the
    // first deadline and never waited for again.
    let ino = write_file(&fs, ROOT_INO, "f", b"still served");
    fs.mkdir(ME, ROOT_INO, b"d", 0o755).unwrap();
    assert_eq!(read_all(&fs, ino), b"still served");
    let states: Vec<_> = fs.mirror().backends().iter().map(|b| b.state()).collect();
    assert!(
        matches!(states[0], crate::mirror::BackendState::Degraded(_)),
        "{states:?}"
    );
    assert_eq!(states[1], crate::mirror::BackendState::Optimal);
    rig.counters[0].clear();
}

#[test]
fn a_bucket_backend_gets_partial_blocks_at_close_and_the_same_bytes() {
    let local = Arc::new(MemoryStore::new("local"));
    let bucket = Arc::new(MemoryStore::whole_objects("bucket"));
    let stores: Vec<(String, Arc<dyn Store>)> = vec![
        ("local".into(), Arc::clone(&local) as Arc<dyn Store>),
        ("bucket".into(), Arc::clone(&bucket) as Arc<dyn Store>),
    ];
    format(&stores, &Fs::root_batch(0, 0)).unwrap();
    let mirror = Mirror::open(stores, MirrorOptions::default()).unwrap();
    let fs = Fs::new(Arc::new(mirror)).unwrap();
    let (rec, fh) = fs.create(ME, ROOT_INO, b"f", 0o644, libc::O_RDWR).unwrap();
    let piece: Vec<u8> = (0..100_000).map(|i| (i % 253) as u8).collect();
    for i in 0..13u64 {
        fs.write(rec.ino, fh, i * 100_000, &piece).unwrap();
    }
    // Block 0 (1 MiB) is complete and sent; block 1 is partial and held in memory.
    let (b0, b1) = (block_key(rec.ino, 0), block_key(rec.ino, 1));
    assert!(bucket.get(&b0).is_ok());
    assert!(bucket.get(&b1).is_err(), "a partial block waits for close");
    assert!(local.get(&b1).is_ok());
    let back = fs.read(rec.ino, 1_250_000, 10).unwrap();
    assert_eq!(back, piece[50_000..50_010].to_vec());
    assert!(!fs.flush_is_noop(rec.ino));
    fs.flush(rec.ino).unwrap();
    fs.release(fh).unwrap();
    let strip = |m: &MemoryStore| {
        let mut snap = m.snapshot();
        snap.remove(crate::layout::SUPERBLOCK_KEY);
        snap.remove(crate::layout::JOURNAL_KEY);
        snap
    };
    assert!(
        strip(&local) == strip(&bucket),
        "the bucket holds what the local store holds"
    );
}
