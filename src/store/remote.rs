//! A backend that keeps each object as an object in a bucket: S3 and S3-compatible servers
//! (Garage, MinIO, Ceph RGW, ...), and, untested, Google Cloud Storage and Azure Blob
//! Storage, all through the `object_store` crate.
//!
//! # Design
//!
//! [`RemoteStore`] wraps an `Arc<dyn ObjectStore>` and a key prefix: key `a/b` of the store
//! opened on `s3://bucket/some/prefix` is the object `some/prefix/a/b` of `bucket`. The
//! [`Store`] trait is synchronous and is called from the plain threads of each backend's
//! worker pool, so every method runs its request with `block_on` on one multi-thread tokio
//! runtime shared by the process (two worker threads drive the sockets). A slow bucket only
//! blocks the threads of its own pool, as a slow disk would.
//!
//! # Semantics and guarantees
//!
//! - `get`, `size` (HEAD) and `get_range` (ranged GET; a range past the end returns the bytes
//!   that exist, possibly none) map to one request each.
//! - `put`, `create` and `rewrite` are one PUT: atomic on S3, a reader sees the old or the
//!   new object.
//! - `write_at` and `truncate` are read-modify-write: GET the whole object (a missing one is
//!   empty), change it in memory (gaps read as zeros), PUT it back. A write that starts at 0
//!   and is at least a whole data block long skips the GET, and so does a write to one of
//!   the last 16 objects this store rewrote (a write-through copy of them is kept; reads
//!   never use it). [`Store::ranged_writes`] is false, so the mirror puts a write buffer
//!   ([`super::BufferedStore`]) in front of this store: file data reaches it as whole-block
//!   PUTs, and `write_at` is left to the appends of the missed-key logs.
//! - `delete` sends a HEAD first, because S3 DELETE succeeds on a missing object and the
//!   trait must answer [`StoreError::NotFound`].
//! - `list` lists the parent "directory" of the prefix and filters, and strips the store
//!   prefix: keys come back exactly as they were given.
//! - `sync` does nothing: a PUT is durable on the server when it returns, so every mutation
//!   that returned is already as durable as the server makes it.
//! - `check` (run every 2 s by the health checks) is a HEAD of the `superblock` object: it
//!   fails when the server is unreachable, denies access, or the superblock is gone.
//! - Client timeouts: 2 s to connect, 30 s per request, at most 2 retries with a short
//!   backoff, so an unreachable endpoint fails within a few seconds instead of hanging.
//! - "Not found" is only returned for a missing object; a missing bucket, refused
//!   credentials or an unreachable server are errors with a one-line reason (see
//!   [`RemoteStore::open`]).
//!
//! - `lock` takes a lease: the object `.lock` below the prefix names the mount that holds
//!   it and is renewed every 10 s (see [`lease`]). A read-only user only checks that no live
//!   lease exists. `list` never returns the lease object, and `check` fails once the lease
//!   was taken over by another mount.
//!
//! # Shortcomings
//!
//! - The lease protects against a second mount only as well as the hosts' clocks agree and
//!   the server honours conditional writes (see [`lease`]).
//! - A request that the mirror gave up on (`--timeout`) is not cancelled on the server: a
//!   frozen server that resumes may still apply a PUT it received before, possibly after
//!   `recover` copied the same key, leaving older bytes there. The client-side request
//!   timeout (30 s) does not close that window.
//! - [`Store::space`] is unknown (`None`).
//! - GCS (`gs://`) and Azure (`az://`) are built from the crates' environment variables
//!   only and are not tested.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::TryStreamExt;
use object_store::client::{HttpError, HttpErrorKind};
use object_store::path::Path as ObjPath;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload,
    RetryConfig,
};

use super::{LockIntent, Store, StoreError, StoreResult};

mod lease;
use lease::{Holder, LeaseError, LeaseObject, LeaseWatch, LEASE_KEY};

/// Writes this long starting at offset 0 cover any data block: no need to read it first.
const WHOLE_BLOCK: usize = crate::layout::DEFAULT_BLOCK_SIZE as usize;

/// The object probed by [`Store::check`].
const CHECK_KEY: &str = crate::layout::SUPERBLOCK_KEY;

/// The process-wide runtime that drives every remote store's requests.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("remote-io")
            .enable_all()
            .build()
            .expect("cannot start the tokio runtime")
    })
}

/// True when a backend argument is a URL (`scheme://...`) rather than a local path.
pub fn is_url(arg: &str) -> bool {
    match arg.split_once("://") {
        Some((scheme, _)) => {
            !scheme.is_empty()
                && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
        }
        None => false,
    }
}

/// Objects stored in a bucket below a key prefix.
pub struct RemoteStore {
    store: Arc<dyn ObjectStore>,
    /// Key prefix inside the bucket, without leading or trailing `/` ("" for the root).
    prefix: String,
    /// `scheme://bucket/prefix`, without options: the location shown and recorded.
    location: String,
    /// `scheme://bucket`, for messages.
    bucket_url: String,
    bucket: String,
    /// The endpoint as shown in messages.
    endpoint: String,
    /// The last objects changed by `write_at` or `truncate`, as this store PUT them (see
    /// [`BlockCache`]).
    cache: BlockCache,
    /// The leases this store took, to report one that was lost (see [`lease`]).
    leases: parking_lot::Mutex<Vec<LeaseWatch>>,
}

/// Write-through copies of the objects that `write_at` and `truncate` rewrote last, so that
/// the next partial write of the same block (a sequential writer filling it piece by piece)
/// need not GET it again. Only ever holds what this store itself PUT; any other change of a
/// key, and any failed request on it, drops its copy. Reads never use it.
struct BlockCache {
    entries: parking_lot::Mutex<Vec<(String, Arc<Vec<u8>>)>>,
}

/// How many objects [`BlockCache`] keeps (each at most [`CACHE_MAX_OBJECT`] bytes).
const CACHE_ENTRIES: usize = 16;
const CACHE_MAX_OBJECT: usize = 2 * WHOLE_BLOCK;

impl BlockCache {
    fn new() -> BlockCache {
        BlockCache {
            entries: parking_lot::Mutex::new(Vec::new()),
        }
    }

    fn get(&self, key: &str) -> Option<Vec<u8>> {
        let entries = self.entries.lock();
        entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_ref().clone())
    }

    fn forget(&self, key: &str) {
        self.entries.lock().retain(|(k, _)| k != key);
    }

    fn remember(&self, key: &str, data: Arc<Vec<u8>>) {
        let mut entries = self.entries.lock();
        entries.retain(|(k, _)| k != key);
        if data.len() <= CACHE_MAX_OBJECT {
            if entries.len() >= CACHE_ENTRIES {
                entries.remove(0);
            }
            entries.push((key.to_string(), data));
        }
    }
}

/// What a URL asked for, before credentials are resolved.
struct Parsed {
    scheme: String,
    bucket: String,
    prefix: String,
    options: HashMap<String, String>,
}

fn parse_url(arg: &str) -> Result<Parsed, String> {
    let url = url::Url::parse(arg).map_err(|e| format!("bad backend URL {arg}: {e}"))?;
    let scheme = url.scheme().to_string();
    let bucket = url.host_str().unwrap_or("").to_string();
    if bucket.is_empty() {
        return Err(format!("bad backend URL {arg}: no bucket name"));
    }
    let prefix = url.path().trim_matches('/').to_string();
    if prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
        return Err(format!("bad backend URL {arg}: bad key prefix {prefix:?}"));
    }
    let mut options = HashMap::new();
    for (k, v) in url.query_pairs() {
        options.insert(k.into_owned(), v.into_owned());
    }
    Ok(Parsed {
        scheme,
        bucket,
        prefix,
        options,
    })
}

/// The location recorded for a backend URL: `scheme://bucket/prefix`, options dropped (they
/// may hold secrets). Any spelling of one backend (trailing `/`, options) gives one location.
pub fn canonical_location(arg: &str) -> Result<String, String> {
    let p = parse_url(arg)?;
    Ok(location_of(&p))
}

fn location_of(p: &Parsed) -> String {
    if p.prefix.is_empty() {
        format!("{}://{}", p.scheme, p.bucket)
    } else {
        format!("{}://{}/{}", p.scheme, p.bucket, p.prefix)
    }
}

/// Client settings: fail fast on an unreachable endpoint.
fn client_options(allow_http: bool) -> ClientOptions {
    ClientOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(30))
        .with_allow_http(allow_http)
}

fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
            base: 2.0,
        },
        max_retries: 2,
        retry_timeout: Duration::from_secs(10),
    }
}

// ----- AWS configuration ---------------------------------------------------------------

/// One profile's settings from `~/.aws/credentials` and `~/.aws/config`.
#[derive(Default, Debug, Clone, PartialEq)]
pub struct Profile {
    pub values: HashMap<String, String>,
}

impl Profile {
    fn get(&self, key: &str) -> Option<String> {
        self.values.get(key).filter(|v| !v.is_empty()).cloned()
    }
}

/// Reads the keys of section `section` of an INI file (`key = value` lines; `#` and `;`
/// comments; indented lines, which are sub-sections such as `s3 =`, are skipped).
pub fn read_ini_section(text: &str, section: &str) -> Option<HashMap<String, String>> {
    let mut found = None;
    let mut current: Option<String> = None;
    for raw in text.lines() {
        if raw.starts_with([' ', '\t']) {
            continue;
        }
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
            current = Some(name);
            if current.as_deref() == Some(section) && found.is_none() {
                found = Some(HashMap::new());
            }
            continue;
        }
        if current.as_deref() != Some(section) {
            continue;
        }
        if let (Some(map), Some((k, v))) = (found.as_mut(), line.split_once('=')) {
            map.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    found
}

fn home_file(env: &str, default: &str) -> Option<PathBuf> {
    match std::env::var_os(env) {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(default)),
    }
}

/// The named profile from the shared credentials file and the config file (credentials
/// first). `None` when neither file has it.
pub fn load_profile(name: &str) -> Option<Profile> {
    let mut values = HashMap::new();
    let mut seen = false;
    let config_section = if name == "default" {
        "default".to_string()
    } else {
        format!("profile {name}")
    };
    let files = [
        (
            home_file("AWS_CONFIG_FILE", ".aws/config"),
            vec![config_section, name.to_string()],
        ),
        (
            home_file("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials"),
            vec![name.to_string()],
        ),
    ];
    // The config file first, so that the credentials file wins where both set a key.
    for (file, sections) in files {
        let Some(text) = file.and_then(|f| std::fs::read_to_string(f).ok()) else {
            continue;
        };
        for section in sections {
            if let Some(map) = read_ini_section(&text, &section) {
                seen = true;
                values.extend(map);
                break;
            }
        }
    }
    seen.then_some(Profile { values })
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// Resolved settings of an S3 backend.
#[derive(Debug, Default, PartialEq)]
pub struct S3Settings {
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub virtual_hosted: bool,
    pub anonymous: bool,
}

const S3_OPTIONS: [&str; 8] = [
    "endpoint",
    "region",
    "profile",
    "access_key_id",
    "secret_access_key",
    "session_token",
    "virtual_hosted",
    "anonymous",
];

fn parse_bool(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(format!(
            "bad value for URL option {key}: {v} (true or false)"
        )),
    }
}

/// Resolves the settings of an S3 backend from URL options (first), then, when the URL
/// names a profile, that profile, then the environment, then the profile of `AWS_PROFILE`
/// (or `default`).
pub fn resolve_s3(options: &HashMap<String, String>) -> Result<S3Settings, String> {
    for key in options.keys() {
        if !S3_OPTIONS.contains(&key.as_str()) {
            return Err(format!(
                "unknown option {key} in backend URL (known: {})",
                S3_OPTIONS.join(", ")
            ));
        }
    }
    let opt = |k: &str| options.get(k).filter(|v| !v.is_empty()).cloned();
    let url_profile = opt("profile");
    let profile_name = url_profile
        .clone()
        .or_else(|| env("AWS_PROFILE"))
        .unwrap_or_else(|| "default".into());
    let profile = load_profile(&profile_name);
    if profile.is_none() && (url_profile.is_some() || env("AWS_PROFILE").is_some()) {
        return Err(format!(
            "AWS profile {profile_name:?} not found in the AWS config or credentials file"
        ));
    }
    let profile = profile.unwrap_or_default();

    // Credentials come as a whole from one source.
    type Creds = (String, Option<String>, Option<String>);
    let from_url: Option<Creds> =
        opt("access_key_id").map(|k| (k, opt("secret_access_key"), opt("session_token")));
    let from_env: Option<Creds> = env("AWS_ACCESS_KEY_ID").map(|k| {
        (
            k,
            env("AWS_SECRET_ACCESS_KEY"),
            env("AWS_SESSION_TOKEN").or_else(|| env("AWS_SECURITY_TOKEN")),
        )
    });
    let from_profile: Option<Creds> = profile.get("aws_access_key_id").map(|k| {
        (
            k,
            profile.get("aws_secret_access_key"),
            profile.get("aws_session_token"),
        )
    });
    let env_endpoint = env("AWS_ENDPOINT_URL_S3").or_else(|| env("AWS_ENDPOINT_URL"));
    let env_region = env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION"));
    let prof_endpoint = profile.get("endpoint_url");
    let prof_region = profile.get("region");
    let (creds, endpoint, region) = if url_profile.is_some() {
        (
            from_url.or(from_profile).or(from_env),
            opt("endpoint").or(prof_endpoint).or(env_endpoint),
            opt("region").or(prof_region).or(env_region),
        )
    } else {
        (
            from_url.or(from_env).or(from_profile),
            opt("endpoint").or(env_endpoint).or(prof_endpoint),
            opt("region").or(env_region).or(prof_region),
        )
    };
    let anonymous = match options.get("anonymous") {
        Some(v) => parse_bool("anonymous", v)?,
        None => false,
    };
    let virtual_hosted = match options.get("virtual_hosted") {
        Some(v) => parse_bool("virtual_hosted", v)?,
        None => false,
    };
    let mut s = S3Settings {
        endpoint: endpoint.map(|e| e.trim_end_matches('/').to_string()),
        region: region.unwrap_or_else(|| "us-east-1".into()),
        virtual_hosted,
        anonymous,
        ..S3Settings::default()
    };
    if let Some((key, secret, token)) = creds {
        let Some(secret) = secret else {
            return Err("an access key id is set but no secret access key \
                        (AWS_SECRET_ACCESS_KEY, aws_secret_access_key or secret_access_key=)"
                .into());
        };
        s.access_key_id = Some(key);
        s.secret_access_key = Some(secret);
        s.session_token = token;
    } else if !anonymous {
        // Never fall back to instance metadata: say what is missing instead.
        return Err(
            "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, \
                    an AWS profile, or access_key_id= and secret_access_key= in the URL"
                .into(),
        );
    }
    Ok(s)
}

/// Environment variables that give Google Cloud Storage credentials. Without one (or the
/// application-default credentials file), a GCS client would ask the instance metadata
/// server, which is never wanted here.
const GCS_CREDENTIALS: [&str; 4] = [
    "GOOGLE_SERVICE_ACCOUNT",
    "GOOGLE_SERVICE_ACCOUNT_PATH",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    "GOOGLE_APPLICATION_CREDENTIALS",
];

/// Environment variables that give Azure credentials (see [`GCS_CREDENTIALS`]).
const AZURE_CREDENTIALS: [&str; 6] = [
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_ACCESS_KEY",
    "AZURE_STORAGE_SAS_KEY",
    "AZURE_STORAGE_TOKEN",
    "AZURE_CLIENT_SECRET",
    "AZURE_STORAGE_USE_EMULATOR",
];

fn any_env(names: &[&str]) -> bool {
    names.iter().any(|n| env(n).is_some())
}

// ----- errors ----------------------------------------------------------------------------

/// The text of an error and all its sources, for classification.
fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let _ = write!(text, " | {s}");
        source = s.source();
    }
    text
}

/// How a failed request is reported.
enum Failure {
    NotFound,
    Message(String),
}

impl RemoteStore {
    /// Opens the backend named by `arg` (`s3://bucket/prefix?options`, `gs://bucket/prefix`,
    /// `az://container/prefix`) and checks with one request that the bucket exists and
    /// answers with these credentials. Errors are one line, e.g. `access denied by
    /// s3://bucket (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)`, `bucket "x" does not
    /// exist at http://127.0.0.1:3900`, `cannot reach http://127.0.0.1:3900: connection
    /// refused`.
    pub fn open(arg: &str) -> Result<RemoteStore, String> {
        let store = Self::connect(arg)?;
        store.probe()?;
        Ok(store)
    }

    /// Builds the client without sending any request.
    pub fn connect(arg: &str) -> Result<RemoteStore, String> {
        let p = parse_url(arg)?;
        let location = location_of(&p);
        let bucket_url = format!("{}://{}", p.scheme, p.bucket);
        let _enter = runtime().enter();
        let (store, endpoint): (Arc<dyn ObjectStore>, String) = match p.scheme.as_str() {
            "s3" | "s3a" => {
                let s = resolve_s3(&p.options).map_err(|e| format!("{location}: {e}"))?;
                let allow_http = s
                    .endpoint
                    .as_deref()
                    .is_some_and(|e| e.starts_with("http://"));
                let endpoint = s
                    .endpoint
                    .clone()
                    .unwrap_or_else(|| format!("AWS S3 ({})", s.region));
                let mut b = object_store::aws::AmazonS3Builder::new()
                    .with_bucket_name(&p.bucket)
                    .with_region(&s.region)
                    .with_virtual_hosted_style_request(s.virtual_hosted)
                    .with_client_options(client_options(allow_http))
                    .with_retry(retry_config())
                    .with_skip_signature(s.anonymous);
                if let Some(e) = &s.endpoint {
                    b = b.with_endpoint(e);
                }
                if let (Some(k), Some(secret)) = (&s.access_key_id, &s.secret_access_key) {
                    b = b.with_access_key_id(k).with_secret_access_key(secret);
                }
                if let Some(t) = &s.session_token {
                    b = b.with_token(t);
                }
                let built = b.build().map_err(|e| format!("{location}: {e}"))?;
                (Arc::new(built), endpoint)
            }
            "gs" => {
                if !p.options.is_empty() {
                    return Err(format!("{location}: gs:// URLs take no options"));
                }
                let adc = std::env::var_os("HOME").map(|h| {
                    PathBuf::from(h).join(".config/gcloud/application_default_credentials.json")
                });
                if !any_env(&GCS_CREDENTIALS) && !adc.is_some_and(|f| f.is_file()) {
                    return Err(format!(
                        "{location}: no Google Cloud credentials (set one of {})",
                        GCS_CREDENTIALS.join(", ")
                    ));
                }
                let built = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(&p.bucket)
                    .with_client_options(client_options(false))
                    .with_retry(retry_config())
                    .build()
                    .map_err(|e| format!("{location}: {e}"))?;
                (Arc::new(built), "Google Cloud Storage".into())
            }
            "az" | "azure" => {
                if !p.options.is_empty() {
                    return Err(format!("{location}: az:// URLs take no options"));
                }
                if !any_env(&AZURE_CREDENTIALS) {
                    return Err(format!(
                        "{location}: no Azure credentials (set AZURE_STORAGE_ACCOUNT_NAME and \
                         one of {})",
                        AZURE_CREDENTIALS.join(", ")
                    ));
                }
                let built = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_container_name(&p.bucket)
                    .with_client_options(client_options(false))
                    .with_retry(retry_config())
                    .build()
                    .map_err(|e| format!("{location}: {e}"))?;
                (Arc::new(built), "Azure Blob Storage".into())
            }
            other => {
                return Err(format!(
                    "unsupported backend URL scheme {other}:// (s3://, gs:// or az://)"
                ))
            }
        };
        Ok(RemoteStore {
            store,
            prefix: p.prefix,
            location,
            bucket_url,
            bucket: p.bucket,
            endpoint,
            cache: BlockCache::new(),
            leases: parking_lot::Mutex::new(Vec::new()),
        })
    }

    /// The location recorded for this backend (`scheme://bucket/prefix`).
    pub fn location(&self) -> &str {
        &self.location
    }

    /// One listing request below the prefix: fails when the bucket is missing, access is
    /// denied or the server cannot be reached.
    pub fn probe(&self) -> Result<(), String> {
        self.first_keys().map(|_| ())
    }

    /// True when nothing is stored below the prefix.
    pub fn is_empty(&self) -> Result<bool, String> {
        self.first_keys().map(|n| n == 0)
    }

    /// Number of entries (objects or common prefixes) of the first page of a listing of
    /// the prefix.
    fn first_keys(&self) -> Result<usize, String> {
        let dir = self.dir_path("");
        let listed = self.run(async { self.store.list_with_delimiter(dir.as_ref()).await });
        match listed {
            Ok(l) => Ok(l.objects.len() + l.common_prefixes.len()),
            Err(e) => Err(match self.classify(&e, true) {
                Failure::NotFound => self.no_bucket(),
                Failure::Message(m) => m,
            }),
        }
    }

    fn lease_object(&self) -> StoreResult<LeaseObject> {
        Ok(LeaseObject {
            store: Arc::clone(&self.store),
            path: self.path(LEASE_KEY)?,
            location: self.location.clone(),
        })
    }

    fn lease_error(&self, e: LeaseError) -> StoreError {
        match e {
            LeaseError::Busy(_) => StoreError::Io(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!("backend is {e}"),
            )),
            LeaseError::Request(e) => self.fail(e),
            LeaseError::TimedOut => StoreError::Io(io::Error::other(format!(
                "cannot reach {}: its lease request timed out",
                self.endpoint
            ))),
            LeaseError::Vanished => StoreError::Io(io::Error::other(e.to_string())),
        }
    }

    fn no_bucket(&self) -> String {
        format!(
            "bucket \"{}\" does not exist at {}",
            self.bucket, self.endpoint
        )
    }

    fn run<F: std::future::Future>(&self, f: F) -> F::Output {
        runtime().block_on(f)
    }

    /// The object path of `key`.
    fn path(&self, key: &str) -> StoreResult<ObjPath> {
        let full = if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        };
        ObjPath::parse(&full).map_err(|e| StoreError::Io(io::Error::other(e.to_string())))
    }

    /// The "directory" to list for keys in `key_dir` (which is "" or ends with `/`).
    fn dir_path(&self, key_dir: &str) -> Option<ObjPath> {
        let full = format!("{}/{}", self.prefix, key_dir.trim_end_matches('/'));
        let full = full.trim_matches('/');
        (!full.is_empty()).then(|| ObjPath::from_iter(full.split('/')))
    }

    /// Sorts an error into "not found" (a missing object) or a one-line message.
    /// `listing` says whether the request was on the bucket rather than on an object, so
    /// that a 404 means the bucket is missing.
    fn classify(&self, e: &object_store::Error, listing: bool) -> Failure {
        let text = chain_text(e);
        if text.contains("NoSuchBucket") {
            return Failure::Message(self.no_bucket());
        }
        let denied = matches!(
            e,
            object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. }
        ) || [
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "AccessDenied",
            "Forbidden",
        ]
        .iter()
        .any(|m| text.contains(m));
        if denied {
            let hint = if self.bucket_url.starts_with("s3") {
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
            } else {
                "the credentials"
            };
            return Failure::Message(format!(
                "access denied by {} (check {hint})",
                self.bucket_url
            ));
        }
        if let object_store::Error::NotFound { .. } = e {
            return if listing {
                Failure::Message(self.no_bucket())
            } else {
                Failure::NotFound
            };
        }
        let lower = text.to_ascii_lowercase();
        let http_kind = http_error_kind(e);
        if lower.contains("connection refused") {
            return Failure::Message(format!(
                "cannot reach {}: connection refused",
                self.endpoint
            ));
        }
        if http_kind == Some(HttpErrorKind::Timeout) || lower.contains("timed out") {
            return Failure::Message(format!("cannot reach {}: timed out", self.endpoint));
        }
        if lower.contains("dns error") || lower.contains("failed to lookup") {
            return Failure::Message(format!("cannot reach {}: unknown host name", self.endpoint));
        }
        if http_kind == Some(HttpErrorKind::Connect) {
            return Failure::Message(format!("cannot reach {}: {}", self.endpoint, innermost(e)));
        }
        let line = text.lines().next().unwrap_or("").trim().to_string();
        Failure::Message(format!("{}: {line}", self.location))
    }

    fn fail(&self, e: object_store::Error) -> StoreError {
        match self.classify(&e, false) {
            Failure::NotFound => StoreError::NotFound,
            Failure::Message(m) => StoreError::Io(io::Error::other(m)),
        }
    }

    fn put_bytes(&self, key: &str, data: Vec<u8>) -> StoreResult<()> {
        self.cache.forget(key);
        let path = self.path(key)?;
        self.run(self.store.put(&path, PutPayload::from(data)))
            .map(|_| ())
            .map_err(|e| self.fail(e))
    }

    /// PUTs the new content of a block and remembers it for the next partial write.
    fn put_block(&self, key: &str, data: Vec<u8>) -> StoreResult<()> {
        self.cache.forget(key);
        let path = self.path(key)?;
        let data = Arc::new(data);
        // `Bytes::from_owner` shares the buffer with the cache instead of copying it.
        let payload = PutPayload::from(bytes::Bytes::from_owner(ArcBytes(Arc::clone(&data))));
        self.run(self.store.put(&path, payload))
            .map_err(|e| self.fail(e))?;
        self.cache.remember(key, data);
        Ok(())
    }

    /// The whole object (from the cache when this store wrote it last), or an empty buffer
    /// when it does not exist.
    fn get_or_empty(&self, key: &str) -> StoreResult<Vec<u8>> {
        if let Some(data) = self.cache.get(key) {
            return Ok(data);
        }
        match self.get(key) {
            Err(StoreError::NotFound) => Ok(Vec::new()),
            other => other,
        }
    }
}

/// A shared buffer as the owner of a `Bytes`.
struct ArcBytes(Arc<Vec<u8>>);

impl AsRef<[u8]> for ArcBytes {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

/// The kind of the HTTP failure behind an error, if it is one.
fn http_error_kind(e: &(dyn std::error::Error + 'static)) -> Option<HttpErrorKind> {
    let mut source = Some(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<HttpError>() {
            return Some(h.kind());
        }
        source = s.source();
    }
    None
}

/// The innermost source of an error, as one line.
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e;
    while let Some(s) = last.source() {
        last = s;
    }
    last.to_string().lines().next().unwrap_or("").to_string()
}

impl Store for RemoteStore {
    fn describe(&self) -> String {
        self.location.clone()
    }

    fn get(&self, key: &str) -> StoreResult<Vec<u8>> {
        let path = self.path(key)?;
        self.run(async {
            let r = self.store.get(&path).await?;
            r.bytes().await
        })
        .map(|b| b.to_vec())
        .map_err(|e| self.fail(e))
    }

    fn size(&self, key: &str) -> StoreResult<u64> {
        let path = self.path(key)?;
        self.run(self.store.head(&path))
            .map(|m| m.size)
            .map_err(|e| self.fail(e))
    }

    fn get_range(&self, key: &str, offset: u64, len: usize) -> StoreResult<Vec<u8>> {
        if len == 0 {
            return self.size(key).map(|_| Vec::new());
        }
        let path = self.path(key)?;
        let opts = GetOptions {
            range: Some(GetRange::Bounded(offset..offset + len as u64)),
            ..GetOptions::default()
        };
        let got = self.run(async {
            let r = self.store.get_opts(&path, opts).await?;
            r.bytes().await
        });
        match got {
            Ok(b) => Ok(b.to_vec()),
            Err(e) => match self.classify(&e, false) {
                Failure::NotFound => Err(StoreError::NotFound),
                // A range that starts at or past the end (416), or an empty object that
                // the server answers in full: find the size and cut locally.
                Failure::Message(m) => {
                    let size = self.size(key)?;
                    if offset >= size {
                        Ok(Vec::new())
                    } else if size <= (WHOLE_BLOCK as u64) * 4 {
                        let all = self.get(key)?;
                        let end = (offset as usize + len).min(all.len());
                        Ok(all[offset as usize..end].to_vec())
                    } else {
                        Err(StoreError::Io(io::Error::other(m)))
                    }
                }
            },
        }
    }

    fn put(&self, key: &str, data: &[u8]) -> StoreResult<()> {
        self.put_bytes(key, data.to_vec())
    }

    fn write_at(&self, key: &str, offset: u64, data: &[u8]) -> StoreResult<()> {
        if offset == 0 && data.len() >= WHOLE_BLOCK {
            return self.put_block(key, data.to_vec());
        }
        let mut obj = self.get_or_empty(key)?;
        let start = usize::try_from(offset)
            .map_err(|_| StoreError::Io(io::Error::other("offset too large")))?;
        let end = start + data.len();
        if obj.len() < end {
            obj.resize(end, 0);
        }
        obj[start..end].copy_from_slice(data);
        self.put_block(key, obj)
    }

    fn truncate(&self, key: &str, len: u64) -> StoreResult<()> {
        let len = usize::try_from(len)
            .map_err(|_| StoreError::Io(io::Error::other("length too large")))?;
        let mut obj = if len == 0 {
            Vec::new()
        } else {
            self.get_or_empty(key)?
        };
        obj.resize(len, 0);
        self.put_block(key, obj)
    }

    fn delete(&self, key: &str) -> StoreResult<()> {
        // S3 DELETE succeeds on a missing object; the trait wants NotFound.
        self.cache.forget(key);
        self.size(key)?;
        let path = self.path(key)?;
        self.run(self.store.delete(&path)).map_err(|e| self.fail(e))
    }

    fn list(&self, prefix: &str) -> StoreResult<Vec<String>> {
        let key_dir = match prefix.rfind('/') {
            Some(i) => &prefix[..=i],
            None => "",
        };
        let dir = self.dir_path(key_dir);
        let strip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let metas: Vec<object_store::ObjectMeta> = self
            .run(self.store.list(dir.as_ref()).try_collect())
            .map_err(|e| match self.classify(&e, true) {
                Failure::NotFound => StoreError::Io(io::Error::other(self.no_bucket())),
                Failure::Message(m) => StoreError::Io(io::Error::other(m)),
            })?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let full = m.location.as_ref();
                let key = full.get(strip..)?;
                (key.starts_with(prefix) && key != LEASE_KEY).then(|| key.to_string())
            })
            .collect())
    }

    fn sync(&self) -> StoreResult<()> {
        // A PUT (or DELETE) is durable on the server when it returns.
        Ok(())
    }

    fn ranged_writes(&self) -> bool {
        false
    }

    fn lock(&self, intent: LockIntent) -> StoreResult<Option<Box<dyn Send + Sync>>> {
        let object = self.lease_object()?;
        match intent {
            LockIntent::Read => match object.check_free() {
                Ok(()) => Ok(None),
                Err(e) => Err(self.lease_error(e)),
            },
            LockIntent::Write => {
                let lease = object
                    .acquire(Holder::this_process())
                    .map_err(|e| self.lease_error(e))?;
                self.leases.lock().push(lease.watcher());
                Ok(Some(Box::new(lease)))
            }
        }
    }

    fn check(&self) -> Result<(), String> {
        if let Some(why) = self.leases.lock().iter().find_map(LeaseWatch::lost) {
            return Err(format!("{}: {why}", self.location));
        }
        match self.size(CHECK_KEY) {
            Ok(_) => Ok(()),
            Err(StoreError::NotFound) => Err(format!(
                "{}: the superblock is gone (bucket emptied or replaced?)",
                self.location
            )),
            Err(e) => Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_recognised() {
        assert!(is_url("s3://bucket/prefix"));
        assert!(is_url("gs://b"));
        assert!(!is_url("/disk1/m"));
        assert!(!is_url("relative/dir"));
        assert!(!is_url("weird dir://x"));
    }

    #[test]
    fn location_drops_options_and_slashes() {
        assert_eq!(
            canonical_location("s3://b/p/q/?endpoint=http://x:1&secret_access_key=s").unwrap(),
            "s3://b/p/q"
        );
        assert_eq!(canonical_location("s3://b").unwrap(), "s3://b");
        assert_eq!(canonical_location("s3://b/").unwrap(), "s3://b");
        assert!(canonical_location("s3:///p").is_err());
    }

    #[test]
    fn ini_sections() {
        let text = "[default]\naws_access_key_id = A\n\n[profile x]\nregion=r1\ns3 =\n  \
                    endpoint_url = nested\nendpoint_url = http://e:1\n# c\n[other]\nregion=no\n";
        let d = read_ini_section(text, "default").unwrap();
        assert_eq!(d.get("aws_access_key_id").map(String::as_str), Some("A"));
        let x = read_ini_section(text, "profile x").unwrap();
        assert_eq!(x.get("region").map(String::as_str), Some("r1"));
        assert_eq!(
            x.get("endpoint_url").map(String::as_str),
            Some("http://e:1")
        );
        assert!(read_ini_section(text, "missing").is_none());
    }

    #[test]
    fn url_options_win_and_unknown_ones_are_refused() {
        let mut o = HashMap::new();
        o.insert("endpoint".to_string(), "http://127.0.0.1:1/".to_string());
        o.insert("access_key_id".to_string(), "K".to_string());
        o.insert("secret_access_key".to_string(), "S".to_string());
        o.insert("region".to_string(), "garage".to_string());
        let s = resolve_s3(&o).unwrap();
        assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:1"));
        assert_eq!(s.access_key_id.as_deref(), Some("K"));
        assert_eq!(s.region, "garage");
        assert!(!s.virtual_hosted);
        o.insert("colour".to_string(), "blue".to_string());
        assert!(resolve_s3(&o)
            .unwrap_err()
            .contains("unknown option colour"));
    }
}
