//! Integrity on real mounts, driven through the `mirrorfs` binary: damage is planted in the
//! object files of stopped backends (a flipped byte in a data block, a corrupted inode
//! record, a deleted directory entry, records rewritten and re-sealed with a valid checksum
//! but wrong content), then the mount, `mirrorfs scrub` and `mirrorfs fsck` must find it,
//! answer reads only with the right bytes, and repair what a good copy exists for.
//!
//! On-disk format relied on (see `src/store/checksum.rs` and `src/layout.rs`):
//! - data block `b/<ino&0xff>/<ino:016x>.<index:08x>`: a 4096-byte header (one CRC-32C per
//!   4 KiB page, then zeros), then the bytes, so byte `o` of the file (in block `o / 1 MiB`)
//!   is at raw offset `4096 + o % 1 MiB`;
//! - inode record `i/<ino&0xff>/<ino:016x>` and directory entry
//!   `d/<parent&0xff>/<parent:016x>/<hash>`: `<crc32c of the JSON, 8 lower-case hex> <JSON>`,
//!   possibly followed by padding spaces that the checksum does not cover.
//!
//! Every test works in its own fixture directory, so they run in parallel.

mod common;

use common::*;
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use serde_json::Value;
use std::ffi::OsStr;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

// ---------------------------------------------------------------------------------------
// helpers: on-disk objects
// ---------------------------------------------------------------------------------------

/// Data block size of a default-formatted filesystem.
const BLOCK: u64 = 1 << 20;
/// Bytes of a data block object's checksum header (4 per 4 KiB page of a 1 MiB block).
const HEADER: u64 = 4096;
/// Checksummed page size.
const PAGE: u64 = 4096;

/// Path of data block `index` of inode `ino` on backend `b`; it must exist, and be the one
/// found by listing `b/b/*/`.
#[track_caller]
fn block_obj(b: &Path, ino: u64, index: u64) -> PathBuf {
    let name = format!("{ino:016x}.{index:08x}");
    let mut found = Vec::new();
    for dir in std::fs::read_dir(b.join("b")).expect("list b/") {
        let dir = dir.unwrap().path();
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap().path();
            if f.file_name() == Some(OsStr::new(&name)) {
                found.push(f);
            }
        }
    }
    assert_eq!(
        found.len(),
        1,
        "block {index} of inode {ino:#x} on {}: found {found:?}",
        b.display()
    );
    let want = b.join(format!("b/{:02x}/{name}", ino & 0xff));
    assert_eq!(found[0], want, "block object in an unexpected directory");
    found.pop().unwrap()
}

/// Block objects of inode `ino` on backend `b`, by index.
fn blocks_of(b: &Path, ino: u64) -> Vec<u64> {
    let dir = b.join(format!("b/{:02x}", ino & 0xff));
    let prefix = format!("{ino:016x}.");
    let mut out: Vec<u64> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| {
                let name = e.ok()?.file_name().to_string_lossy().into_owned();
                u64::from_str_radix(name.strip_prefix(&prefix)?, 16).ok()
            })
            .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Path of the inode record of `ino` on backend `b`.
fn inode_obj(b: &Path, ino: u64) -> PathBuf {
    b.join(format!("i/{:02x}/{ino:016x}", ino & 0xff))
}

/// Path of the directory entry in `parent` that names inode `ino` on backend `b`.
#[track_caller]
fn dirent_obj(b: &Path, parent: u64, ino: u64) -> PathBuf {
    let dir = b.join(format!("d/{:02x}/{parent:016x}", parent & 0xff));
    let mut found = Vec::new();
    for f in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("list {}: {e}", dir.display())) {
        let f = f.unwrap().path();
        let rec: Value = serde_json::from_str(&read_record(&f)).unwrap();
        if rec["ino"].as_u64() == Some(ino) {
            found.push(f);
        }
    }
    assert_eq!(
        found.len(),
        1,
        "entries naming inode {ino:#x} in {}: {found:?}",
        dir.display()
    );
    found.pop().unwrap()
}

/// Raw offset, inside its block object, of byte `off` of a file, and the block index.
fn raw_pos(off: u64) -> (u64, u64) {
    (off / BLOCK, HEADER + off % BLOCK)
}

/// Flips bits of the byte at `at` in the file at `path` (length unchanged).
#[track_caller]
fn flip(path: &Path, at: u64) {
    let mut raw = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert!(
        (at as usize) < raw.len(),
        "{}: offset {at} past its end ({})",
        path.display(),
        raw.len()
    );
    raw[at as usize] ^= 0x5a;
    std::fs::write(path, &raw).unwrap();
}

/// The JSON of a stored record, whose checksum must be right.
#[track_caller]
fn read_record(path: &Path) -> String {
    let raw = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read record {}: {e}", path.display()));
    let (crc, json) = raw
        .split_once(' ')
        .unwrap_or_else(|| panic!("{}: no checksum prefix: {raw:?}", path.display()));
    let json = json.trim_end_matches(' ');
    assert_eq!(
        u32::from_str_radix(crc, 16).ok(),
        Some(crc32c::crc32c(json.as_bytes())),
        "{}: record checksum is wrong before the test touched it",
        path.display()
    );
    json.to_string()
}

/// Writes a record, sealed with the right checksum.
fn write_record(path: &Path, json: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let sealed = format!("{:08x} {json}", crc32c::crc32c(json.as_bytes()));
    std::fs::write(path, sealed).unwrap();
}

/// `text` with the single occurrence of `from` replaced by `to`.
#[track_caller]
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "{from:?} should occur once in {text}"
    );
    text.replacen(from, to, 1)
}

/// Hashes of every object file of a backend (not its lock), one per line: "unchanged"
/// means this is unchanged.
fn backend_snapshot(b: &Path) -> String {
    sh(&format!(
        "cd {} && find . -type f ! -name .lock -print0 | sort -z | xargs -0 -r sha256sum",
        q(b)
    ))
}

/// The data block objects of all backends must be byte for byte the same, and so must the
/// inode and directory entry records up to the trailing spaces that in-place rewrites pad
/// them with (superblocks differ by member id and are not compared).
#[track_caller]
fn assert_objects_identical(backends: &[PathBuf]) {
    for b in &backends[1..] {
        for tree in ["b", "i", "d"] {
            let out = Command::new("diff")
                .arg(if tree == "b" { "-r" } else { "-rZ" })
                .arg(backends[0].join(tree))
                .arg(b.join(tree))
                .output()
                .expect("run diff");
            assert!(
                out.status.success(),
                "objects under {tree}/ differ between {} and {}:\n{}{}",
                backends[0].display(),
                b.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// helpers: commands
// ---------------------------------------------------------------------------------------

/// Runs `mirrorfs ARGS...` with a 60 s hang guard.
fn run(args: &[&dyn AsRef<OsStr>]) -> Output {
    run_timed(Command::new(bin()).args(args), Duration::from_secs(60))
}

/// Runs a shell command line that may fail; returns its output.
fn sh_output(cmd: &str) -> Output {
    Command::new("bash")
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .output()
        .expect("run bash")
}

/// `mirrorfs fsck BACKENDS... [--repair]`.
fn fsck(backends: &[PathBuf], repair: bool) -> Output {
    let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"fsck"];
    for b in backends {
        args.push(b);
    }
    if repair {
        args.push(&"--repair");
    }
    run(&args)
}

/// Asserts a command failed with exit status `want` and exactly one non-empty line on
/// stderr and nothing on stdout; returns the line.
#[track_caller]
fn assert_one_line_failure(out: &Output, want: i32, what: &str) -> String {
    assert_eq!(code(out), want, "{what}: exit status\n{}", text(out));
    assert!(
        out.stdout.is_empty(),
        "{what}: expected nothing on stdout\n{}",
        text(out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: expected one line\n{}", text(out));
    lines[0].to_string()
}

/// The first two steps of the fsck cycle on planted damage: a check finds it (exit 2, every
/// needle in the output, nothing written), a repair fixes it all (exit 1). Returns the
/// output of the repair. The third step is [`assert_fsck_clean`].
#[track_caller]
fn fsck_find_then_repair(backends: &[PathBuf], needles: &[&str], what: &str) -> String {
    let before: Vec<String> = backends.iter().map(|b| backend_snapshot(b)).collect();
    let check = fsck(backends, false);
    assert_eq!(
        code(&check),
        2,
        "{what}: fsck without --repair must exit 2 (damage left)\n{}",
        text(&check)
    );
    let out = String::from_utf8_lossy(&check.stdout).into_owned();
    for n in needles {
        assert!(
            out.contains(n),
            "{what}: fsck output should name the problem ({n:?})\n{}",
            text(&check)
        );
    }
    assert!(
        out.contains("not repaired"),
        "{what}: summary should say damage is left\n{}",
        text(&check)
    );
    for (b, snap) in backends.iter().zip(&before) {
        assert_same(
            &format!("{what}: {} after fsck without --repair", b.display()),
            snap,
            &backend_snapshot(b),
        );
    }

    let repair = fsck(backends, true);
    assert_eq!(
        code(&repair),
        1,
        "{what}: fsck --repair must exit 1 (all repaired)\n{}",
        text(&repair)
    );
    let rep = String::from_utf8_lossy(&repair.stdout).into_owned();
    for n in needles {
        assert!(
            rep.contains(n),
            "{what}: fsck --repair output should name the problem ({n:?})\n{}",
            text(&repair)
        );
    }
    assert!(
        rep.contains("all repaired"),
        "{what}: fsck --repair summary\n{}",
        text(&repair)
    );

    rep
}

/// A check of the backends finds nothing (exit 0, "clean").
#[track_caller]
fn assert_fsck_clean(backends: &[PathBuf], what: &str) {
    let out = fsck(backends, false);
    assert!(
        code(&out) == 0 && String::from_utf8_lossy(&out.stdout).contains("clean"),
        "{what}: fsck should find nothing (exit 0)\n{}",
        text(&out)
    );
}

/// `mirrorfs status MNT --json`.
#[track_caller]
fn status_json(mnt: &Path) -> Value {
    let out = run(&[&"status", &mnt, &"--json"]);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json is not JSON: {e}\n{}", text(&out)))
}

/// The status entry of the backend at `path`.
#[track_caller]
fn member<'a>(st: &'a Value, path: &Path) -> &'a Value {
    let want = std::fs::canonicalize(path).unwrap().display().to_string();
    st["backends"]
        .as_array()
        .unwrap_or_else(|| panic!("status has no backends: {st:#}"))
        .iter()
        .find(|m| m["location"].as_str() == Some(want.as_str()))
        .unwrap_or_else(|| panic!("no backend {want} in status:\n{st:#}"))
}

#[track_caller]
fn checksum_errors(st: &Value, path: &Path) -> u64 {
    let m = member(st, path);
    m["checksum_errors"]
        .as_u64()
        .unwrap_or_else(|| panic!("no numeric checksum_errors: {m}"))
}

#[track_caller]
fn scrub_field(st: &Value, field: &str) -> u64 {
    st["scrub"][field]
        .as_u64()
        .unwrap_or_else(|| panic!("status has no numeric scrub.{field}:\n{st:#}"))
}

/// `mirrorfs scrub MNT --wait`.
fn scrub_wait(mnt: &Path) -> Output {
    run(&[&"scrub", &mnt, &"--wait"])
}

/// The number printed before `word` in `line` ("..., 4 repaired, ...").
#[track_caller]
fn number_before(out: &str, word: &str) -> u64 {
    let at = out
        .find(&format!(" {word}"))
        .unwrap_or_else(|| panic!("no {word:?} in {out:?}"));
    out[..at]
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number before {word:?} in {out:?}"))
}

// ---------------------------------------------------------------------------------------
// helpers: contents
// ---------------------------------------------------------------------------------------

fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn ino_of(p: &Path) -> u64 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .ino()
}

/// `len` bytes at `off` of the file at `p`, through a fresh open.
fn read_at(p: &Path, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(p)?;
    f.seek(SeekFrom::Start(off))?;
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf)?;
    Ok(buf)
}

/// Writes `data` to `rel` in the mount and keeps a copy as `fx/orig-<name>`.
fn put_file(fx: &Fixture, m: &Mount, rel: &str, data: &[u8]) -> PathBuf {
    let copy = fx.path(&format!("orig-{}", rel.replace('/', "_")));
    std::fs::write(&copy, data).unwrap();
    std::fs::write(m.path(rel), data).unwrap_or_else(|e| panic!("write {rel}: {e}"));
    copy
}

/// `cmp ORIG FILE`: true when identical; panics with the output when they differ or a read
/// fails, since every read must return exactly the right bytes.
#[track_caller]
fn cmp_ok(orig: &Path, file: &Path, what: &str) {
    let out = sh_output(&format!("cmp {} {}", q(orig), q(file)));
    assert!(
        out.status.success(),
        "{what}: read returned wrong bytes or failed\n{}",
        text(&out)
    );
}

// ---------------------------------------------------------------------------------------
// 1. self-healing reads
// ---------------------------------------------------------------------------------------

#[test]
fn flipped_data_byte_on_one_backend_is_healed() {
    let fx = Fixture::new(2);
    let (b0, b1) = (&fx.backends[0], &fx.backends[1]);
    let data = random_bytes(1, 3 * BLOCK as usize + 12_345);
    let m = fx.mount();
    let orig = put_file(&fx, &m, "f", &data);
    let ino = ino_of(&m.path("f"));
    m.unmount();

    assert_eq!(
        blocks_of(b0, ino),
        vec![0, 1, 2, 3],
        "block objects of the file"
    );
    let off = BLOCK + 300_000; // in page 73 of block 1
    let (index, raw) = raw_pos(off);
    assert_eq!(index, 1);
    let obj0 = block_obj(b0, ino, 1);
    let obj1 = block_obj(b1, ino, 1);
    assert_eq!(std::fs::read(&obj0).unwrap(), std::fs::read(&obj1).unwrap());
    // The planted byte really is byte `off` of the file.
    assert_eq!(
        std::fs::read(&obj0).unwrap()[raw as usize],
        data[off as usize]
    );
    flip(&obj0, raw);

    // An offline check sees it (and, without --repair, leaves it).
    let check = fsck(&fx.backends, false);
    assert_eq!(code(&check), 2, "fsck on a flipped byte\n{}", text(&check));
    let out = String::from_utf8_lossy(&check.stdout);
    let key = format!("b/{:02x}/{ino:016x}.00000001", ino & 0xff);
    assert!(
        out.lines()
            .any(|l| l.contains(&key) && l.contains("checksum") && l.contains("b0")),
        "fsck should name the block, the checksum and b0:\n{}",
        text(&check)
    );

    let m = fx.mount();
    let f = m.path("f");
    let mut healed = false;
    for _ in 0..60 {
        cmp_ok(&orig, &f, "read with one bad copy");
        let st = status_json(&fx.mnt);
        assert_eq!(
            checksum_errors(&st, b1),
            0,
            "b1's copy is good and must never count a checksum error:\n{st:#}"
        );
        if checksum_errors(&st, b0) >= 1 {
            healed = true;
            break;
        }
    }
    assert!(
        healed,
        "60 whole-file reads never counted the bad copy on b0 (checksum_errors stayed 0)"
    );
    // Reads still return the right bytes after the repair.
    cmp_ok(&orig, &f, "read after the repair");
    m.unmount();

    assert_eq!(
        std::fs::read(&obj0).unwrap(),
        std::fs::read(&obj1).unwrap(),
        "b0's block 1 should have been rewritten from b1's"
    );
    assert_objects_identical(&fx.backends);
    let again = fsck(&fx.backends, false);
    assert_eq!(code(&again), 0, "fsck after healing\n{}", text(&again));
}

#[test]
fn same_page_bad_everywhere_gives_eio() {
    let fx = Fixture::new(2);
    let data = random_bytes(2, 3 * BLOCK as usize + 4321);
    let m = fx.mount();
    put_file(&fx, &m, "f", &data);
    let ino = ino_of(&m.path("f"));
    m.unmount();

    let off = BLOCK + 40_000; // page 9 of block 1
    let (index, raw) = raw_pos(off);
    for b in &fx.backends {
        flip(&block_obj(b, ino, index), raw);
    }
    let page = off / PAGE;

    let m = fx.mount();
    let f = m.path("f");
    let dd = sh_output(&format!(
        "dd if={} of=/dev/null bs=4096 skip={page} count=1",
        q(&f)
    ));
    assert!(
        !dd.status.success() && String::from_utf8_lossy(&dd.stderr).contains("Input/output error"),
        "dd of the page that is bad everywhere must fail with EIO\n{}",
        text(&dd)
    );
    let cat = sh_output(&format!("cat {} > /dev/null", q(&f)));
    assert!(
        !cat.status.success()
            && String::from_utf8_lossy(&cat.stderr).contains("Input/output error"),
        "cat of the whole file must fail with EIO\n{}",
        text(&cat)
    );
    let err = read_at(&f, page * PAGE, PAGE as usize).expect_err("reading the bad page");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");

    // The mount is still up, and the other blocks read right.
    assert!(is_mounted(&fx.mnt), "the mount went away after an EIO");
    for (start, len) in [
        (0, BLOCK as usize),
        (2 * BLOCK, BLOCK as usize),
        (3 * BLOCK, 4321),
        (BLOCK + 65_536, 8192), // block 1, away from the bad page
    ] {
        let got =
            read_at(&f, start, len).unwrap_or_else(|e| panic!("read {len} bytes at {start}: {e}"));
        assert!(
            got == data[start as usize..start as usize + len],
            "wrong bytes at {start}+{len}"
        );
    }
    let st = status_json(&fx.mnt);
    assert_eq!(
        st["state"], "optimal",
        "a checksum error must not degrade:\n{st:#}"
    );
    for b in &fx.backends {
        assert!(
            checksum_errors(&st, b) >= 1,
            "both copies are bad, both should be counted:\n{st:#}"
        );
    }
    std::fs::write(m.path("after"), b"still writable").unwrap();
    assert_eq!(std::fs::read(m.path("after")).unwrap(), b"still writable");
    m.unmount();
}

// ---------------------------------------------------------------------------------------
// 3, 4. scrub
// ---------------------------------------------------------------------------------------

#[test]
fn scrub_repairs_data_and_metadata_on_several_backends() {
    let fx = Fixture::new(3);
    let (b0, b1, b2) = (&fx.backends[0], &fx.backends[1], &fx.backends[2]);
    let big = random_bytes(3, 2 * BLOCK as usize + 500_000);
    let m = fx.mount();
    put_file(&fx, &m, "a", &random_bytes(4, 5000));
    put_file(&fx, &m, "big", &big);
    std::fs::create_dir(m.path("sub")).unwrap();
    put_file(&fx, &m, "sub/c", &random_bytes(5, 100_000));
    put_file(&fx, &m, "sub/d", b"small file\n");
    std::os::unix::fs::symlink("sub/c", m.path("link")).unwrap();
    let a_ino = ino_of(&m.path("a"));
    let big_ino = ino_of(&m.path("big"));
    let sub_ino = ino_of(&m.path("sub"));
    let d_ino = ino_of(&m.path("sub/d"));
    let manifest = tree_manifest(&fx.mnt);
    m.unmount();

    // b0: a byte of big's block 0; b1: a byte of big's block 2.
    flip(&block_obj(b0, big_ino, 0), HEADER + 123_456);
    flip(&block_obj(b1, big_ino, 2), HEADER + 400_000);
    // b2: one character of a's inode record, same length, checksum left as it was.
    let rec = inode_obj(b2, a_ino);
    let json = read_record(&rec);
    let raw = std::fs::read_to_string(&rec).unwrap();
    std::fs::write(&rec, replace_once(&raw, "\"nlink\":1,", "\"nlink\":7,")).unwrap();
    assert!(json.contains("\"nlink\":1,"));
    // b1: the entry of sub/d removed.
    std::fs::remove_file(dirent_obj(b1, sub_ino, d_ino)).unwrap();

    let m = fx.mount();
    let out = scrub_wait(&fx.mnt);
    assert_eq!(code(&out), 0, "scrub --wait should succeed\n{}", text(&out));
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    let repaired = number_before(&line, "repaired");
    // Nothing reads the damaged objects between the mount and the scrub, so the scrub is
    // what repairs (and counts) all four copies.
    assert!(
        repaired >= 4,
        "4 copies were damaged, scrub says {repaired} repaired\n{line}"
    );
    assert_eq!(number_before(&line, "unrecoverable"), 0, "{line}");
    let st = status_json(&fx.mnt);
    assert_eq!(st["scrub"]["running"], false, "{st:#}");
    assert_eq!(scrub_field(&st, "unrecoverable"), 0, "{st:#}");
    assert_eq!(scrub_field(&st, "errors"), 0, "{st:#}");
    assert_eq!(
        scrub_field(&st, "repaired"),
        repaired,
        "status and scrub output disagree"
    );
    assert!(scrub_field(&st, "objects_done") >= 10, "{st:#}");
    for b in [b0, b1, b2] {
        assert_eq!(
            checksum_errors(&st, b),
            1,
            "{} held one copy failing its checksum:\n{st:#}",
            b.display()
        );
    }
    assert_same("mount after scrub", &manifest, &tree_manifest(&fx.mnt));
    m.unmount();

    assert_objects_identical(&fx.backends);
    let check = fsck(&fx.backends, false);
    assert_eq!(code(&check), 0, "fsck after scrub\n{}", text(&check));
    for b in &fx.backends {
        let m = fx.mount_with(std::slice::from_ref(b), &["-o", "ro"]);
        assert_same(
            &format!("{} alone, read-only", b.display()),
            &manifest,
            &tree_manifest(&fx.mnt),
        );
        m.unmount();
    }
}

#[test]
fn scrub_reports_unrecoverable() {
    let fx = Fixture::new(2);
    let data = random_bytes(6, BLOCK as usize + 10_000);
    let m = fx.mount();
    let orig_other = put_file(&fx, &m, "other", &random_bytes(7, 50_000));
    put_file(&fx, &m, "f", &data);
    let ino = ino_of(&m.path("f"));
    m.unmount();
    for b in &fx.backends {
        flip(&block_obj(b, ino, 0), HEADER + 2 * PAGE + 17);
    }

    let m = fx.mount();
    let out = scrub_wait(&fx.mnt);
    assert_ne!(
        code(&out),
        0,
        "scrub with no good copy must fail\n{}",
        text(&out)
    );
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        number_before(&all, "unrecoverable") >= 1,
        "scrub output should count the unrecoverable block\n{all}"
    );
    let st = status_json(&fx.mnt);
    assert_eq!(st["scrub"]["running"], false, "{st:#}");
    assert!(scrub_field(&st, "unrecoverable") >= 1, "{st:#}");
    assert_eq!(
        scrub_field(&st, "repaired"),
        0,
        "nothing could be repaired:\n{st:#}"
    );
    // The rest of the filesystem still serves.
    cmp_ok(
        &orig_other,
        &m.path("other"),
        "undamaged file after the scrub",
    );
    assert!(read_at(&m.path("f"), BLOCK, 10_000).is_ok_and(|d| d == data[BLOCK as usize..]));
    m.unmount();
    // `mirrorfs scrub --help`: "exit 0 when every object has a good copy everywhere, 2 when
    // some could not be repaired".
    assert_eq!(
        code(&out),
        2,
        "scrub --wait with unrecoverable damage: its help promises exit status 2\n{}",
        text(&out)
    );
}

/// Every damaged copy a scrub finds must be counted in its `repaired` total, inode records
/// included. 16 records are damaged on one backend of two, so a scrub that lets anything
/// else repair them first (its key lock loads each inode through the mount's self-healing
/// read, which starts on the bad copy half of the time) miscounts in all but 1 run in 65536.
#[test]
fn scrub_counts_the_inode_records_it_repairs() {
    const N: usize = 16;
    let fx = Fixture::new(2);
    let b1 = &fx.backends[1];
    let m = fx.mount();
    let mut inos = Vec::new();
    for i in 0..N {
        let rel = format!("f{i:02}");
        put_file(&fx, &m, &rel, format!("file {i}\n").as_bytes());
        inos.push(ino_of(&m.path(&rel)));
    }
    let manifest = tree_manifest(&fx.mnt);
    m.unmount();
    for &ino in &inos {
        let rec = inode_obj(b1, ino);
        read_record(&rec);
        let raw = std::fs::read_to_string(&rec).unwrap();
        std::fs::write(&rec, replace_once(&raw, "\"nlink\":1,", "\"nlink\":5,")).unwrap();
    }

    let m = fx.mount();
    let out = scrub_wait(&fx.mnt);
    assert_eq!(code(&out), 0, "scrub --wait should succeed\n{}", text(&out));
    let st = status_json(&fx.mnt);
    assert_eq!(
        checksum_errors(&st, b1),
        N as u64,
        "each bad record counts one checksum error:\n{st:#}"
    );
    assert_eq!(checksum_errors(&st, &fx.backends[0]), 0, "{st:#}");
    assert_same("mount after scrub", &manifest, &tree_manifest(&fx.mnt));
    m.unmount();
    assert_objects_identical(&fx.backends);
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        (
            number_before(&line, "repaired"),
            scrub_field(&st, "repaired")
        ),
        (N as u64, N as u64),
        "{N} inode records were bad on b1 and are now repaired, but the scrub (output, \
         status) does not count them all:\n{line}"
    );
}

// ---------------------------------------------------------------------------------------
// 5. fsck
// ---------------------------------------------------------------------------------------

#[test]
fn fsck_moves_unnamed_inodes_to_lost_found() {
    let fx = Fixture::new(2);
    let m = fx.mount();
    let f_data = random_bytes(8, BLOCK as usize + 777);
    let orig_f = put_file(&fx, &m, "f", &f_data);
    let orig_keep = put_file(&fx, &m, "keep", b"kept\n");
    std::fs::create_dir(m.path("sub")).unwrap();
    let orig_c = put_file(&fx, &m, "sub/c", &random_bytes(9, 30_000));
    let f_ino = ino_of(&m.path("f"));
    let sub_ino = ino_of(&m.path("sub"));
    m.unmount();

    for b in &fx.backends {
        std::fs::remove_file(dirent_obj(b, 1, f_ino)).unwrap();
        std::fs::remove_file(dirent_obj(b, 1, sub_ino)).unwrap();
    }
    let rep = fsck_find_then_repair(
        &fx.backends,
        &[
            &format!("inode {f_ino:#x} (File) is not in any directory"),
            &format!("inode {sub_ino:#x} (Dir) is not in any directory"),
        ],
        "entries removed everywhere",
    );
    assert!(rep.contains("moved to /lost+found"), "{rep}");

    let m = fx.mount();
    let lf = m.path("lost+found");
    let f_new = lf.join(format!("#{f_ino:x}"));
    let sub_new = lf.join(format!("#{sub_ino:x}"));
    assert!(
        !m.path("f").exists() && !m.path("sub").exists(),
        "old names came back"
    );
    cmp_ok(&orig_f, &f_new, "adopted file");
    cmp_ok(&orig_c, &sub_new.join("c"), "file in adopted directory");
    cmp_ok(&orig_keep, &m.path("keep"), "untouched file");
    assert_eq!(ino_of(&f_new), f_ino);
    assert_eq!(ino_of(&sub_new), sub_ino);
    let nlink = |p: &Path| std::fs::metadata(p).unwrap().nlink();
    assert_eq!(
        nlink(&fx.mnt),
        3,
        "root: itself, its entry, lost+found's .."
    );
    assert_eq!(nlink(&lf), 3, "lost+found holds one directory");
    assert_eq!(nlink(&sub_new), 2);
    assert_eq!(nlink(&f_new), 1);
    assert_eq!(
        std::fs::metadata(sub_new.join("..")).unwrap().ino(),
        ino_of(&lf),
        "the adopted directory's .. is lost+found"
    );
    let listing = sh(&format!("cd {} && find . | sort", q(&fx.mnt)));
    assert_eq!(
        listing,
        format!(
            ".\n./keep\n./lost+found\n./lost+found/#{f_ino:x}\n./lost+found/#{sub_ino:x}\n\
             ./lost+found/#{sub_ino:x}/c\n"
        )
    );
    let lf_ino = ino_of(&lf);
    m.unmount();
    for b in &fx.backends {
        let rec: Value = serde_json::from_str(&read_record(&inode_obj(b, sub_ino))).unwrap();
        assert_eq!(
            rec["parent"].as_u64(),
            Some(lf_ino),
            "on {}, the record of the directory moved to lost+found must name lost+found \
             ({lf_ino:#x}) as its parent: {rec}",
            b.display()
        );
    }
    // `fsck --repair` said all was repaired: a second check must agree.
    assert_fsck_clean(&fx.backends, "after adopting into lost+found");

    // The adopted entries are ordinary: they can be renamed back.
    let m = fx.mount();
    std::fs::rename(
        m.path("lost+found").join(format!("#{f_ino:x}")),
        m.path("f"),
    )
    .unwrap();
    cmp_ok(&orig_f, &m.path("f"), "renamed back");
    m.unmount();
    assert_fsck_clean(&fx.backends, "after renaming back");
}

#[test]
fn fsck_removes_unlinked_orphan_inode() {
    let fx = Fixture::new(2);
    let m = fx.mount();
    put_file(&fx, &m, "f", &random_bytes(10, 200_000));
    std::fs::create_dir(m.path("dir")).unwrap();
    put_file(&fx, &m, "dir/g", b"g\n");
    let f_ino = ino_of(&m.path("f"));
    let manifest = tree_manifest(&fx.mnt);
    m.unmount();

    // A copy of f's inode record under an unused number, with no links, and a data block.
    let orphan: u64 = 0x5a7;
    assert!(!inode_obj(&fx.backends[0], orphan).exists());
    for b in &fx.backends {
        let json = read_record(&inode_obj(b, f_ino));
        let json = replace_once(
            &json,
            &format!("\"ino\":{f_ino},"),
            &format!("\"ino\":{orphan},"),
        );
        let json = replace_once(&json, "\"nlink\":1,", "\"nlink\":0,");
        write_record(&inode_obj(b, orphan), &json);
        let src = block_obj(b, f_ino, 0);
        let dst = b.join(format!("b/{:02x}/{orphan:016x}.00000000", orphan & 0xff));
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(&src, &dst).unwrap();
        // The planted record is well-formed: only its place in the graph is wrong.
        read_record(&inode_obj(b, orphan));
    }
    fsck_find_then_repair(
        &fx.backends,
        &[&format!(
            "inode {orphan:#x} is not in any directory and has no links left"
        )],
        "unlinked orphan",
    );
    assert_fsck_clean(&fx.backends, "after removing the orphan");
    for b in &fx.backends {
        assert!(
            !inode_obj(b, orphan).exists(),
            "orphan record left on {}",
            b.display()
        );
        assert!(
            blocks_of(b, orphan).is_empty(),
            "orphan data left on {}",
            b.display()
        );
        assert_eq!(blocks_of(b, f_ino), vec![0], "f's data must be kept");
    }
    let m = fx.mount();
    assert_same(
        "after removing the orphan",
        &manifest,
        &tree_manifest(&fx.mnt),
    );
    assert!(
        !m.path("lost+found").exists(),
        "no lost+found is needed for it"
    );
    m.unmount();
}

#[test]
fn fsck_restores_size_to_cover_data() {
    let fx = Fixture::new(2);
    let data = random_bytes(11, 2 * BLOCK as usize + 333_333);
    let m = fx.mount();
    let orig = put_file(&fx, &m, "f", &data);
    let ino = ino_of(&m.path("f"));
    m.unmount();

    let size = data.len();
    for b in &fx.backends {
        let json = read_record(&inode_obj(b, ino));
        let json = replace_once(&json, &format!("\"size\":{size},"), "\"size\":1000,");
        write_record(&inode_obj(b, ino), &json);
    }
    // The shrunken size is what a mount would believe.
    {
        let m = fx.mount_with(&fx.backends, &["-o", "ro"]);
        assert_eq!(std::fs::metadata(m.path("f")).unwrap().len(), 1000);
        m.unmount();
    }
    fsck_find_then_repair(
        &fx.backends,
        &[&format!(
            "inode {ino:#x}: size 1000 is smaller than its data ({size})"
        )],
        "size too small",
    );
    assert_fsck_clean(&fx.backends, "after restoring the size");
    let m = fx.mount();
    assert_eq!(std::fs::metadata(m.path("f")).unwrap().len(), size as u64);
    cmp_ok(&orig, &m.path("f"), "file after its size was restored");
    m.unmount();
}

#[test]
fn fsck_refuses_mounted_backends() {
    let fx = Fixture::new(2);
    let m = fx.mount();
    let orig = put_file(&fx, &m, "f", b"content\n");
    for repair in [false, true] {
        let out = fsck(&fx.backends, repair);
        let line = assert_one_line_failure(&out, 2, "fsck of mounted backends");
        assert!(
            line.contains("in use"),
            "the line should say the backend is in use: {line}"
        );
    }
    assert!(is_mounted(&fx.mnt));
    cmp_ok(&orig, &m.path("f"), "mount after a refused fsck");
    std::fs::write(m.path("g"), b"g").unwrap();
    m.unmount();
    let out = fsck(&fx.backends, false);
    assert_eq!(code(&out), 0, "fsck once unmounted\n{}", text(&out));
}

#[test]
fn fsck_rejects_non_backends() {
    let fx = Fixture::new(1);
    let plain = fx.path("plain");
    std::fs::create_dir(&plain).unwrap();
    std::fs::write(plain.join("x"), b"not an object").unwrap();
    let file = fx.path("file");
    std::fs::write(&file, b"a file").unwrap();
    let missing = fx.path("missing");
    let before = sh(&format!("cd {} && find . | sort", q(&plain)));
    let cases: Vec<(Vec<PathBuf>, &str)> = vec![
        (vec![plain.clone()], "not a mirrorfs backend"),
        (
            vec![fx.backends[0].clone(), plain.clone()],
            "not a mirrorfs backend",
        ),
        (vec![file.clone()], "not a directory"),
        (vec![missing.clone()], "does not exist"),
    ];
    for (args, needle) in cases {
        for repair in [false, true] {
            let out = fsck(&args, repair);
            let what = format!("fsck {args:?} (repair: {repair})");
            let line = assert_one_line_failure(&out, 2, &what);
            assert!(line.contains(needle), "{what}: {line}");
        }
    }
    assert_eq!(
        sh(&format!("cd {} && find . | sort", q(&plain))),
        before,
        "fsck wrote into a directory that is not a backend"
    );
    assert!(!missing.exists());
    let out = fsck(&fx.backends, false);
    assert_eq!(code(&out), 0, "the real backend is clean\n{}", text(&out));
}
