//! Protocol types for E2B's envd wire protocol, as spoken by alcove-agent and its host client.
//!
//! `process` and `filesystem` are generated at build time from `proto/` (prost structs plus
//! proto3-JSON serde impls). `connect` holds the small part of the Connect protocol both ends
//! share: envelope framing, error codes and the end-of-stream message. Nothing here does I/O.

#[allow(clippy::all)]
pub mod process {
    //! `process.Process`: generated from `proto/process/process.proto`.
    include!(concat!(env!("OUT_DIR"), "/process.rs"));
    include!(concat!(env!("OUT_DIR"), "/process.serde.rs"));
}

#[allow(clippy::all)]
pub mod filesystem {
    //! `filesystem.Filesystem`: generated from `proto/filesystem/filesystem.proto`.
    include!(concat!(env!("OUT_DIR"), "/filesystem.rs"));
    include!(concat!(env!("OUT_DIR"), "/filesystem.serde.rs"));
}

pub mod connect;

pub use pbjson_types::Timestamp;
