//! Errors of the fs layer. The mapping to errno lives in one place, [`FsError::errno`].

use crate::mirror::MirrorError;

/// Why a filesystem operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("invalid argument")]
    Invalid,
    #[error("file name too long")]
    NameTooLong,
    #[error("no such attribute")]
    NoAttr,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("file too large")]
    TooBig,
    #[error("too many links")]
    TooManyLinks,
    #[error("bad file handle")]
    BadHandle,
    #[error("read-only filesystem")]
    ReadOnly,
    #[error("no space left")]
    NoSpace,
    #[error("not supported")]
    NotSupported,
    /// Stored data could not be decoded: the object is damaged.
    #[error("corrupt object {0}")]
    Corrupt(String),
    #[error("I/O error: {0}")]
    Io(String),
}

impl From<MirrorError> for FsError {
    fn from(e: MirrorError) -> FsError {
        match e {
            MirrorError::NotFound => FsError::NotFound,
            MirrorError::NoQuorum(_) | MirrorError::ReadOnly => FsError::ReadOnly,
            MirrorError::NoSpace => FsError::NoSpace,
            MirrorError::Failed(msg) | MirrorError::Corrupt(msg) => FsError::Io(msg),
        }
    }
}

impl FsError {
    /// The errno reported to the kernel.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::Invalid => libc::EINVAL,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            // Linux reports a missing extended attribute as ENODATA.
            FsError::NoAttr => libc::ENODATA,
            FsError::NotPermitted => libc::EPERM,
            FsError::TooBig => libc::EFBIG,
            FsError::TooManyLinks => libc::EMLINK,
            FsError::BadHandle => libc::EBADF,
            // Also the answer when writes are refused for lack of quorum: the mount has
            // become read-only, which is what applications know how to report.
            FsError::ReadOnly => libc::EROFS,
            FsError::NoSpace => libc::ENOSPC,
            FsError::NotSupported => libc::EOPNOTSUPP,
            // Damaged metadata is an I/O error to the application; the detail is logged.
            FsError::Corrupt(_) => libc::EIO,
            FsError::Io(_) => libc::EIO,
        }
    }
}

/// Result type of the fs layer.
pub type FsResult<T> = Result<T, FsError>;
