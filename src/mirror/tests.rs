//! Broadcaster, failover and start-up tests over in-memory stores with fault injection.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::store::{FaultKind, FaultStore, MemoryStore, Op};
use std::sync::atomic::Ordering;

struct Rig {
    mem: Vec<Arc<MemoryStore>>,
    faults: Vec<Arc<FaultStore>>,
}

impl Rig {
    fn new(n: usize) -> Rig {
        let mem: Vec<Arc<MemoryStore>> = (0..n)
            .map(|i| Arc::new(MemoryStore::new(&format!("m{i}"))))
            .collect();
        let faults = mem
            .iter()
            .map(|m| Arc::new(FaultStore::new(Arc::clone(m) as Arc<dyn Store>)))
            .collect();
        let rig = Rig { mem, faults };
        format(&rig.stores(), &vec![]).unwrap();
        rig
    }

    fn stores(&self) -> Vec<(String, Arc<dyn Store>)> {
        self.faults
            .iter()
            .enumerate()
            .map(|(i, f)| (format!("m{i}"), Arc::clone(f) as Arc<dyn Store>))
            .collect()
    }

    fn open(&self, opts: MirrorOptions) -> Mirror {
        Mirror::open(self.stores(), opts).unwrap()
    }

    fn generation(&self, i: usize) -> u64 {
        let data = self.mem[i].get(SUPERBLOCK_KEY).unwrap();
        Superblock::decode(&data).unwrap().generation
    }
}

fn put(key: &str, data: &[u8]) -> Mutation {
    Mutation::Put {
        key: key.into(),
        data: data.into(),
    }
}

fn fast() -> MirrorOptions {
    MirrorOptions {
        timeout: Duration::from_millis(300),
        ..MirrorOptions::default()
    }
}

#[test]
fn every_backend_gets_every_mutation() {
    let rig = Rig::new(3);
    let m = rig.open(fast());
    m.apply(vec![
        put("x/1", b"abc"),
        Mutation::WriteAt {
            key: "x/2".into(),
            offset: 2,
            data: b"zz"[..].into(),
        },
    ])
    .unwrap();
    m.apply(vec![
        Mutation::Delete { key: "x/1".into() },
        Mutation::Delete { key: "nope".into() },
    ])
    .unwrap();
    for mem in &rig.mem {
        assert!(matches!(mem.get("x/1"), Err(StoreError::NotFound)));
        assert_eq!(mem.get("x/2").unwrap(), b"\0\0zz");
    }
    assert_eq!(m.optimal_count(), 3);
}

#[test]
fn failing_backend_is_degraded_and_recorded_on_the_others() {
    let rig = Rig::new(3);
    let m = rig.open(fast());
    let before = rig.generation(0);
    rig.faults[1].fault_nth(Some(Op::Put), 1, FaultKind::Fail);
    m.apply(vec![put("k", b"v")]).unwrap();

    match m.backends()[1].state() {
        BackendState::Degraded(reason) => assert!(reason.contains("injected"), "{reason}"),
        s => panic!("backend 1 should be degraded, is {s:?}"),
    }
    assert!(rig.generation(0) > before);
    assert_eq!(rig.generation(0), rig.generation(2));
    assert!(
        rig.generation(1) < rig.generation(0),
        "degraded member must look stale"
    );
    assert_eq!(rig.mem[0].get("k").unwrap(), b"v");
    assert!(matches!(rig.mem[1].get("k"), Err(StoreError::NotFound)));

    // Later writes skip the degraded member.
    m.apply(vec![put("k2", b"v")]).unwrap();
    assert!(matches!(rig.mem[1].get("k2"), Err(StoreError::NotFound)));
}

#[test]
fn stalled_backend_is_degraded_after_the_deadline() {
    let rig = Rig::new(2);
    let m = rig.open(fast());
    rig.faults[0].fault_nth(Some(Op::Put), 1, FaultKind::Stall(Duration::from_secs(3)));
    m.apply(vec![put("k", b"v")]).unwrap();
    match m.backends()[0].state() {
        BackendState::Degraded(reason) => assert!(reason.contains("no answer"), "{reason}"),
        s => panic!("stalled backend should be degraded, is {s:?}"),
    }
    assert_eq!(rig.mem[1].get("k").unwrap(), b"v");
}

#[test]
fn failure_everywhere_degrades_nobody() {
    let rig = Rig::new(2);
    let m = rig.open(fast());
    for f in &rig.faults {
        f.fault_nth(Some(Op::Put), 1, FaultKind::Fail);
    }
    assert!(matches!(
        m.apply(vec![put("k", b"v")]),
        Err(MirrorError::Failed(_))
    ));
    assert_eq!(m.optimal_count(), 2);
}

#[test]
fn reads_fail_over_and_degrade_the_bad_backend() {
    let rig = Rig::new(2);
    let m = rig.open(fast());
    m.apply(vec![put("k", b"v")]).unwrap();
    rig.faults[0].fault_always(Some(Op::Get), FaultKind::Fail);
    rig.faults[1].clear();
    for _ in 0..4 {
        assert_eq!(m.get("k").unwrap(), b"v");
    }
    assert_eq!(m.optimal_count(), 1);
    assert!(matches!(m.get("missing"), Err(MirrorError::NotFound)));
}

#[test]
fn quorum_refuses_writes_but_serves_reads() {
    let rig = Rig::new(2);
    let m = rig.open(MirrorOptions {
        min_optimal: 2,
        ..fast()
    });
    m.apply(vec![put("k", b"v")]).unwrap();
    rig.faults[0].fault_nth(Some(Op::Put), 1, FaultKind::Fail);
    assert!(matches!(
        m.apply(vec![put("k2", b"v")]),
        Err(MirrorError::NoQuorum(2))
    ));
    assert!(matches!(
        m.apply(vec![put("k3", b"v")]),
        Err(MirrorError::NoQuorum(2))
    ));
    assert_eq!(m.get("k").unwrap(), b"v");
}

#[test]
fn stale_member_starts_degraded() {
    let rig = Rig::new(2);
    {
        let m = rig.open(fast());
        rig.faults[1].fault_nth(Some(Op::Put), 1, FaultKind::Fail);
        m.apply(vec![put("k", b"v")]).unwrap();
        m.close().unwrap();
    }
    let m = rig.open(fast());
    match m.backends()[1].state() {
        BackendState::Degraded(reason) => assert!(reason.contains("stale"), "{reason}"),
        s => panic!("stale member should start degraded, is {s:?}"),
    }
    assert_eq!(m.backends()[0].state(), BackendState::Optimal);
}

#[test]
fn split_brain_is_refused() {
    // A and B optimal; B fails during a write (A goes ahead). Then only B is given: B may
    // not serve as current read-write, because A (recorded optimal in B's table) is missing.
    let rig = Rig::new(2);
    {
        let m = rig.open(fast());
        rig.faults[1].fault_nth(Some(Op::Put), 1, FaultKind::Fail);
        m.apply(vec![put("k", b"v")]).unwrap();
    }
    let only_b = vec![rig.stores().remove(1)];
    let err = Mirror::open(only_b.clone(), fast())
        .err()
        .expect("must refuse");
    assert!(err.0.contains("missing"), "{}", err.0);
    let ro = MirrorOptions {
        read_only: true,
        ..fast()
    };
    assert!(
        Mirror::open(only_b, ro).is_ok(),
        "read-only inspection stays possible"
    );
}

#[test]
fn different_filesystems_are_refused() {
    let a = Rig::new(1);
    let b = Rig::new(1);
    let mut stores = a.stores();
    stores.extend(b.stores());
    let err = Mirror::open(stores, fast()).err().expect("must refuse");
    assert!(err.0.contains("different filesystems"), "{}", err.0);
}

#[test]
fn unformatted_store_is_refused() {
    let s: Arc<dyn Store> = Arc::new(MemoryStore::new("empty"));
    let err = Mirror::open(vec![("empty".into(), s)], fast())
        .err()
        .expect("must refuse");
    assert!(err.0.contains("not a mirrorfs backend"), "{}", err.0);
}

/// A store whose puts wait until `n` puts (on any of the stores sharing the rendezvous) are
/// in progress at once: a serial broadcaster can never get them all there.
struct Rendezvous {
    inner: MemoryStore,
    meet: Arc<(parking_lot::Mutex<usize>, parking_lot::Condvar)>,
    n: usize,
}

impl Store for Rendezvous {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn get(&self, key: &str) -> StoreResult<Vec<u8>> {
        self.inner.get(key)
    }
    fn get_range(&self, key: &str, offset: u64, len: usize) -> StoreResult<Vec<u8>> {
        self.inner.get_range(key, offset, len)
    }
    fn put(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        if key != SUPERBLOCK_KEY {
            let (count, cv) = &*self.meet;
            let mut c = count.lock();
            *c += 1;
            cv.notify_all();
            while *c < self.n {
                if cv.wait_for(&mut c, Duration::from_secs(10)).timed_out() {
                    return Err(StoreError::Io(std::io::Error::other(
                        "alone at the rendezvous",
                    )));
                }
            }
        }
        self.inner.put(key, data)
    }
    fn write_at(&self, key: &str, offset: u64, data: &[u8]) -> StoreResult<()> {
        self.inner.write_at(key, offset, data)
    }
    fn truncate(&self, key: &str, len: u64) -> StoreResult<()> {
        self.inner.truncate(key, len)
    }
    fn delete(&self, key: &str) -> StoreResult<()> {
        self.inner.delete(key)
    }
    fn list(&self, prefix: &str) -> StoreResult<Vec<String>> {
        self.inner.list(prefix)
    }
    fn sync(&self) -> StoreResult<()> {
        Ok(())
    }
    fn ranged_writes(&self) -> bool {
        true
    }
}

#[test]
fn broadcast_runs_backends_in_parallel() {
    let meet = Arc::new((parking_lot::Mutex::new(0), parking_lot::Condvar::new()));
    let stores: Vec<(String, Arc<dyn Store>)> = (0..3)
        .map(|i| {
            let s = Rendezvous {
                inner: MemoryStore::new("r"),
                meet: Arc::clone(&meet),
                n: 3,
            };
            (format!("r{i}"), Arc::new(s) as Arc<dyn Store>)
        })
        .collect();
    format(&stores, &vec![]).unwrap();
    let m = Mirror::open(
        stores,
        MirrorOptions {
            timeout: Duration::from_secs(30),
            ..fast()
        },
    )
    .unwrap();
    m.apply(vec![put("k", b"v")]).unwrap();
    assert_eq!(
        m.optimal_count(),
        3,
        "every put met the others: the broadcast is parallel"
    );
}

fn wait_settled(m: &Mirror, id: u32) -> BackendState {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let state = m.backend(id).unwrap().state();
        if !matches!(state, BackendState::Recovering(_)) && !m.recovery_running() {
            return state;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "recovery did not finish"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every object equal on both stores, superblocks (which name their member) aside.
fn assert_same(a: &MemoryStore, b: &MemoryStore) {
    let strip = |m: &MemoryStore| {
        let mut snap = m.snapshot();
        snap.remove(SUPERBLOCK_KEY);
        snap
    };
    let (sa, sb) = (strip(a), strip(b));
    let only_a: Vec<_> = sa.keys().filter(|k| sb.get(*k) != sa.get(*k)).collect();
    let only_b: Vec<_> = sb.keys().filter(|k| !sa.contains_key(*k)).collect();
    assert!(
        only_a.is_empty() && only_b.is_empty(),
        "differ: {only_a:?} / {only_b:?}"
    );
}

#[test]
fn recovery_copies_only_the_logged_keys() {
    let rig = Rig::new(2);
    let m = Arc::new(rig.open(fast()));
    for i in 0..50 {
        m.apply(vec![put(&format!("k/{i}"), b"old")]).unwrap();
    }
    m.disable(1).unwrap();
    assert!(
        m.disable(0).is_err(),
        "the last optimal backend cannot be disabled"
    );
    m.apply(vec![
        put("k/3", b"new"),
        Mutation::Delete { key: "k/4".into() },
    ])
    .unwrap();
    m.apply(vec![put("k/new", b"fresh")]).unwrap();
    let logged = rig.mem[0].get(&layout::missed_key(1)).unwrap();
    let logged = parse_log(&logged);
    assert_eq!(logged.len(), 3, "{logged:?}");

    m.start_recovery(1).unwrap();
    assert_eq!(wait_settled(&m, 1), BackendState::Optimal);
    assert_same(&rig.mem[0], &rig.mem[1]);
    assert!(
        rig.mem[0].get(&layout::missed_key(1)).is_err(),
        "log removed"
    );
    assert_eq!(rig.generation(0), rig.generation(1));
    assert!(
        m.start_recovery(1).is_err(),
        "an optimal member cannot be recovered"
    );
}

#[test]
fn replacement_is_filled_while_writes_go_on() {
    let rig = Rig::new(2);
    let m = Arc::new(rig.open(fast()));
    for i in 0..200 {
        m.apply(vec![put(&format!("k/{i}"), &[i as u8; 3000])])
            .unwrap();
    }
    let fresh = Arc::new(MemoryStore::new("fresh"));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (m, stop) = (Arc::clone(&m), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("k/{}", n % 250);
                let batch = match n % 3 {
                    0 => vec![put(&key, &n.to_le_bytes())],
                    1 => vec![Mutation::Delete { key }],
                    _ => vec![Mutation::WriteAt {
                        key,
                        offset: 10,
                        data: b"zz"[..].into(),
                    }],
                };
                m.apply(batch).unwrap();
                n += 1;
            }
            n
        })
    };
    m.replace(1, "fresh".into(), Arc::clone(&fresh) as Arc<dyn Store>)
        .unwrap();
    assert_eq!(wait_settled(&m, 1), BackendState::Optimal);
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(writes > 0);
    assert_same(&rig.mem[0], &fresh);
    assert_eq!(m.backend(1).unwrap().location, "fresh");
    let sb = Superblock::decode(&fresh.get(SUPERBLOCK_KEY).unwrap()).unwrap();
    assert_eq!(sb.member_id, 1);
}

#[test]
fn failed_recovery_leaves_the_member_degraded_with_the_reason() {
    let rig = Rig::new(2);
    let m = Arc::new(rig.open(fast()));
    m.apply(vec![put("a", b"1")]).unwrap();
    m.disable(1).unwrap();
    m.apply(vec![put("b", b"2")]).unwrap();
    rig.faults[1].fault_always(Some(Op::Put), FaultKind::Fail);
    m.start_recovery(1).unwrap();
    match wait_settled(&m, 1) {
        BackendState::Degraded(reason) => assert!(reason.contains("recovery failed"), "{reason}"),
        s => panic!("expected degraded, got {s:?}"),
    }
    rig.faults[1].clear();
    m.start_recovery(1).unwrap();
    assert_eq!(wait_settled(&m, 1), BackendState::Optimal);
    assert_same(&rig.mem[0], &rig.mem[1]);
}

#[test]
fn a_bad_copy_is_answered_around_counted_and_repaired() {
    let rig = Rig::new(2);
    let m = rig.open(fast());
    let key = layout::block_key(9, 0);
    let data: Vec<u8> = (0..20_000).map(|i| (i % 251) as u8).collect();
    m.apply(vec![Mutation::WriteAt {
        key: key.clone(),
        offset: 0,
        data: data.clone().into(),
    }])
    .unwrap();
    // Flip a byte of the second page on backend 0, under the checksums.
    let mut raw = rig.mem[0].get(&key).unwrap();
    let header = raw.len() - data.len();
    raw[header + 5000] ^= 1;
    rig.mem[0].put(&key, &raw).unwrap();
    for _ in 0..8 {
        let got = m.get_range_healing(&key, 4096, 4096).unwrap();
        assert_eq!(got, data[4096..8192].to_vec());
    }
    let backends = m.backends();
    assert_eq!(
        backends[0].counters.checksum_errors.load(Ordering::Relaxed),
        1
    );
    assert_eq!(rig.mem[0].get(&key).unwrap(), rig.mem[1].get(&key).unwrap());

    // Bad on both: the read fails, and never with wrong bytes.
    for mem in &rig.mem {
        let mut raw = mem.get(&key).unwrap();
        raw[header + 5000] ^= 1;
        mem.put(&key, &raw).unwrap();
    }
    assert!(matches!(
        m.get_range_healing(&key, 4096, 100),
        Err(MirrorError::Corrupt(_))
    ));
    // Other pages of the block still read.
    assert_eq!(
        m.get_range_healing(&key, 0, 10).unwrap(),
        data[..10].to_vec()
    );
}

#[test]
fn the_journal_marks_each_batch_done_on_every_backend() {
    let rig = Rig::new(2);
    let m = rig.open(fast());
    m.apply(vec![put(&layout::inode_key(5), b"{\"a\":1}")])
        .unwrap();
    m.apply(vec![Mutation::WriteAt {
        key: layout::block_key(5, 0),
        offset: 0,
        data: b"xyz"[..].into(),
    }])
    .unwrap();
    for mem in &rig.mem {
        let parsed = journal::parse(&mem.get(layout::JOURNAL_KEY).unwrap());
        assert_eq!(parsed.entries.len(), 2);
        assert_eq!(
            parsed.oks,
            parsed.entries.keys().copied().collect::<BTreeSet<u64>>()
        );
    }
    m.close().unwrap();
    assert!(matches!(
        rig.mem[0].get(layout::JOURNAL_KEY),
        Err(StoreError::NotFound)
    ));
}

#[test]
fn after_a_reboot_an_unclean_mirror_is_compared_and_made_identical() {
    let rig = Rig::new(2);
    let key = layout::block_key(7, 0);
    {
        let m = rig.open(fast());
        m.apply(vec![Mutation::WriteAt {
            key: key.clone(),
            offset: 0,
            data: vec![1u8; 9000].into(),
        }])
        .unwrap();
        // No close: as if the machine stopped here.
    }
    // Backend 1 got a different (but well-formed) version, and the boot changed.
    let sb = Superblock::decode(&rig.mem[0].get(SUPERBLOCK_KEY).unwrap()).unwrap();
    assert!(!sb.clean);
    let wrapped = ChecksumStore::new(Arc::clone(&rig.mem[1]) as Arc<dyn Store>, sb.block_size);
    wrapped.write_at(&key, 100, b"other").unwrap();
    for mem in &rig.mem {
        let mut sb = Superblock::decode(&mem.get(SUPERBLOCK_KEY).unwrap()).unwrap();
        sb.boot_id = "an earlier boot".into();
        mem.put(SUPERBLOCK_KEY, &sb.encode()).unwrap();
    }
    let m = rig.open(fast());
    assert_eq!(rig.mem[0].get(&key).unwrap(), rig.mem[1].get(&key).unwrap());
    assert_eq!(m.get(&key).unwrap(), vec![1u8; 9000]);
}

#[test]
fn a_full_journal_is_emptied_and_carries_the_files_written() {
    let rig = Rig::new(2);
    let m = rig.open(fast());
    {
        let mut j = m.journal.lock();
        j.checkpoint_bytes = 2000;
        j.checkpoint_age = Duration::ZERO;
    }
    for i in 0..60u64 {
        m.apply(vec![Mutation::WriteAt {
            key: layout::block_key(0x40 + i % 3, 0),
            offset: i * 10,
            data: b"0123456789"[..].into(),
        }])
        .unwrap();
    }
    for mem in &rig.mem {
        let data = mem.get(layout::JOURNAL_KEY).unwrap();
        assert!(
            data.len() < 4000,
            "journal not emptied: {} bytes",
            data.len()
        );
        let parsed = journal::parse(&data);
        assert!(!parsed.carried.is_empty(), "written files carried over");
        assert!(parsed
            .carried
            .is_subset(&[0x40, 0x41, 0x42].into_iter().collect()));
        assert_eq!(
            parsed.oks,
            parsed.entries.keys().copied().collect::<BTreeSet<u64>>()
        );
    }
    // A crash now (no close) is repaired at the next open from the emptied journal.
    drop(m);
    let again = rig.open(fast());
    // Block of file 0x40: written at offsets 0, 30, ..., 570, ten bytes each.
    assert_eq!(again.get(&layout::block_key(0x40, 0)).unwrap().len(), 580);
    assert_eq!(
        rig.mem[0].get(&layout::block_key(0x40, 0)).unwrap(),
        rig.mem[1].get(&layout::block_key(0x40, 0)).unwrap()
    );
}

#[test]
fn a_crash_repair_spreads_a_good_copy_when_the_finished_one_fails_its_checksum() {
    let rig = Rig::new(2);
    let key = layout::block_key(9, 0);
    let bytes: Vec<u8> = (0..30_000u32).map(|i| (i % 251) as u8).collect();
    {
        let m = rig.open(fast());
        let write = |from: usize, to: usize| Mutation::WriteAt {
            key: key.clone(),
            offset: from as u64,
            data: bytes[from..to].into(),
        };
        m.apply(vec![write(0, 9000)]).unwrap();
        m.apply(vec![write(20_000, 30_000)]).unwrap();
        // No close: as if the process died here.
    }
    // Backend 1 never wrote the second batch's "done" line, so backend 0's copy is the one
    // to spread; but a page that batch did not touch has rotted on backend 0.
    let journal = rig.mem[1].get(layout::JOURNAL_KEY).unwrap();
    let text = String::from_utf8_lossy(&journal);
    let ok = text.rfind("{\"ok\":").unwrap();
    let start = text[..ok].rfind('\n').map_or(0, |i| i + 1);
    let end = ok + text[ok..].find('\n').unwrap();
    let mut cut = journal.clone();
    cut[start..end].fill(0);
    rig.mem[1].put(layout::JOURNAL_KEY, &cut).unwrap();
    let mut raw = rig.mem[0].get(&key).unwrap();
    raw[4096 + 10] ^= 0x40;
    rig.mem[0].put(&key, &raw).unwrap();

    let m = rig.open(fast());
    let mut want = bytes.clone();
    want[9000..20_000].fill(0);
    assert_eq!(m.get(&key).unwrap(), want);
    assert_eq!(rig.mem[0].get(&key).unwrap(), rig.mem[1].get(&key).unwrap());
}
