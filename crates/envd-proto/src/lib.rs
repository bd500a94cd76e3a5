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

/// Written by the agent on the virtio-serial channel at the start of every HTTP/2 session,
/// before the server's SETTINGS frame. A host that reconnects can receive the last bytes of the
/// previous session first (written while no host was connected); it drops everything up to this
/// marker. Only the channel uses it: the agent's TCP listener speaks plain HTTP.
pub const CHANNEL_SESSION_MARKER: &[u8] = b"\0alcove-session\0";

/// The envd protocol version the agent implements, as reported to the SDKs (which switch
/// features on by it: stdin, default user, octet-stream upload, file metadata, watch entries).
pub const ENVD_VERSION: &str = "0.6.4";
