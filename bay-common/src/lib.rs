//! What bay-tracker and bay-proxy share: validated names and digests, deterministic torrents,
//! the tracker's wire types and HTTP API, and the upstream registry client.

pub mod access;
pub mod announce;
pub mod api;
pub mod digest;
pub mod flags;
pub mod logging;
pub mod manifest;
pub mod metrics;
pub mod open_files;
pub mod pool;
mod quote;
pub mod range;
pub mod reference;
pub mod runtime;
pub mod serve;
pub mod shutdown;
pub mod store;
pub mod torrent;
pub mod upstream;

pub use digest::{Algorithm, Digest, DigestError, Verifier};
pub use reference::{NameError, Registry, RegistryError, RepositoryName, Scheme};
