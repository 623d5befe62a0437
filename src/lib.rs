//! mirrorfs: a FUSE filesystem that keeps every file in several object stores at once.
//!
//! Layers, top to bottom (see docs/ARCHITECTURE.md):
//! - [`fuse`]: the adapter between the kernel and the fs layer;
//! - [`fs`]: the filesystem model (inodes, directories, handles) over objects;
//! - [`mirror`]: backends, their states, the parallel broadcaster and failover reads;
//! - [`store`]: the object store trait and its implementations;
//! - [`layout`]: object keys and encodings shared by the layers above.
//!
//! The command-line front end lives in [`cli`]; [`control`] is how it talks to a mount.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod cli;
pub mod control;
pub mod fs;
pub mod fsck;
pub mod fuse;
pub mod host;
pub mod layout;
pub mod mirror;
pub mod pool;
pub mod store;
