//! `cargo bench --bench s3_bench`: a bucket backend against the raw S3 API, side by side.
//!
//! Starts a single-node Garage server (see `tests/common/garage.rs`), then:
//! 1. raw: PUT `MIRRORFS_BENCH_MIB` (default 1024) objects of 1 MiB one after the other with
//!    `object_store`, then GET them back;
//! 2. mirror: a mirror of one local directory and a bucket prefix on the same server;
//!    sequential write of a file of the same size (`dd bs=1M conv=fsync`), the same with
//!    `cp` (128 KiB writes, gathered into whole blocks by the write buffer), then, after an
//!    unmount, a remount and dropping the page cache (when root), a cold sequential read
//!    (served by the local disk, which reads prefer), and the same read with the bucket
//!    mounted alone read-only.
//!
//! Prints MiB/s of each and the ratios mirror/raw. Speed is reported, never asserted.

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::Instant;

use common::garage::{mount_env, Garage};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStoreExt, PutPayload};

const MIB: usize = 1 << 20;

fn rate(mib: usize, secs: f64) -> f64 {
    mib as f64 / secs
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
}

fn sh(cmd: &str) {
    let st = Command::new("bash")
        .arg("-c")
        .arg(cmd)
        .status()
        .expect("bash");
    assert!(st.success(), "failed: {cmd}");
}

fn main() {
    let mib: usize = std::env::var("MIRRORFS_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let garage = Garage::start_new();
    println!(
        "s3 benchmark: {mib} MiB against Garage at {}",
        garage.endpoint()
    );

    // Random data (Garage compresses, so zeros would flatter both sides).
    let dir = tempfile::Builder::new()
        .prefix("mirrorfs-s3-bench-")
        .tempdir()
        .expect("tempdir");
    let src = dir.path().join("src");
    sh(&format!(
        "head -c {} /dev/urandom > '{}'",
        mib * MIB,
        src.display()
    ));

    // 1. raw object_store
    let store = AmazonS3Builder::new()
        .with_endpoint(garage.endpoint())
        .with_region(common::garage::REGION)
        .with_bucket_name(&garage.bucket)
        .with_access_key_id(&garage.key_id)
        .with_secret_access_key(&garage.secret)
        .with_allow_http(true)
        .build()
        .expect("s3 client");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let data = std::fs::read(&src).expect("read source");
    let t = Instant::now();
    for i in 0..mib {
        let chunk = data[i * MIB..(i + 1) * MIB].to_vec();
        rt.block_on(store.put(&ObjPath::from(format!("raw/{i}")), PutPayload::from(chunk)))
            .expect("put");
    }
    let raw_put = rate(mib, t.elapsed().as_secs_f64());
    let t = Instant::now();
    let mut total = 0;
    for i in 0..mib {
        let got = rt
            .block_on(async {
                store
                    .get(&ObjPath::from(format!("raw/{i}")))
                    .await?
                    .bytes()
                    .await
            })
            .expect("get");
        total += got.len();
    }
    assert_eq!(total, mib * MIB);
    let raw_get = rate(mib, t.elapsed().as_secs_f64());
    drop(data);

    // 2. through a mirror of a local directory and the bucket
    let local = dir.path().join("local");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&local).unwrap();
    std::fs::create_dir(&mnt).unwrap();
    let backends = vec![local.display().to_string(), garage.url("bench")];
    let envs = garage.envs();
    let out = Command::new(common::bin())
        .arg("init")
        .args(&backends)
        .envs(envs.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("init");
    assert!(
        out.status.success(),
        "init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = mount_env(&backends, &mnt, &[], &envs);
    drop_caches();
    let t = Instant::now();
    sh(&format!(
        "dd if='{}' of='{}/file' bs=1M conv=fsync status=none",
        src.display(),
        mnt.display()
    ));
    let mirror_write = rate(mib, t.elapsed().as_secs_f64());
    // `cp` writes 128 KiB at a time: the write buffer gathers them into whole blocks.
    let t = Instant::now();
    sh(&format!(
        "cp '{}' '{}/file-cp' && sync '{}/file-cp'",
        src.display(),
        mnt.display(),
        mnt.display()
    ));
    let mirror_cp = rate(mib, t.elapsed().as_secs_f64());
    m.unmount();
    let m = mount_env(&backends, &mnt, &[], &envs);
    drop_caches();
    let t = Instant::now();
    sh(&format!(
        "dd if='{}/file' of=/dev/null bs=1M status=none",
        mnt.display()
    ));
    let mirror_read = rate(mib, t.elapsed().as_secs_f64());
    sh(&format!("cmp '{}' '{}/file'", src.display(), mnt.display()));
    m.unmount();
    // Reads prefer the local disk; the bucket alone shows what reading from it costs.
    let m = mount_env(&backends[1..], &mnt, &["-o", "ro"], &envs);
    drop_caches();
    let t = Instant::now();
    sh(&format!(
        "dd if='{}/file' of=/dev/null bs=1M status=none",
        mnt.display()
    ));
    let bucket_read = rate(mib, t.elapsed().as_secs_f64());
    m.unmount();

    println!(
        "{:<40} {:>12} {:>12} {:>8}",
        "case", "raw MiB/s", "mirror MiB/s", "ratio"
    );
    println!(
        "{:<40} {:>12.1} {:>12.1} {:>8.2}",
        "sequential write (1 MiB objects/writes)",
        raw_put,
        mirror_write,
        mirror_write / raw_put
    );
    println!(
        "{:<40} {:>12.1} {:>12.1} {:>8.2}",
        "sequential write with cp (128 KiB writes)",
        raw_put,
        mirror_cp,
        mirror_cp / raw_put
    );
    println!(
        "{:<40} {:>12.1} {:>12.1} {:>8.2}",
        "sequential read, cold (from the disk)",
        raw_get,
        mirror_read,
        mirror_read / raw_get
    );
    println!(
        "{:<40} {:>12.1} {:>12.1} {:>8.2}",
        "sequential read, bucket alone (-o ro)",
        raw_get,
        bucket_read,
        bucket_read / raw_get
    );
}
