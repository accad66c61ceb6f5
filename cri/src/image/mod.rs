//! The image store: OCI images pulled from registries (or imported from
//! files) become one read-only filesystem disk per image, which pod VMs
//! attach.

pub mod archive;
pub mod auth;
pub mod build;
pub mod client_tls;
pub mod content;
pub mod disk;
pub mod hosts;
pub mod manifest;
mod pull;
pub mod records;
pub mod reference;
pub mod registry;
pub mod store;
pub mod unpack;

pub use store::{DiskLease, FsUsage, ImageStore, Progress, StoreConfig};
