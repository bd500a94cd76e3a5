//! Wire types of E2B's volumes: the registry on the API key (`/volumes`) and the volume content
//! API (`/volumecontent/{volumeID}/…`), as the 2.63 SDKs' generated models spell them, and the
//! `volumeMounts` of sandbox creates and views.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Body of `POST /volumes`.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewVolume {
    /// Unique in the team: 1-64 characters of `A-Z a-z 0-9 _ -`.
    pub name: String,
}

/// A volume as `GET /volumes` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Volume {
    /// `vol_` and 32 hex digits.
    #[serde(rename = "volumeID")]
    pub volume_id: String,
    pub name: String,
}

/// A volume and the token of its content API (`POST /volumes`, `GET /volumes/{volumeID}`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VolumeAndToken {
    #[serde(rename = "volumeID")]
    pub volume_id: String,
    pub name: String,
    /// Send as `Authorization: Bearer <token>` to `/volumecontent/{volumeID}/…`. The same every
    /// time it is asked for; valid for this volume only, for as long as it exists.
    pub token: String,
    /// Never set by Alcove: the content API is on this server's own address, which the SDKs
    /// take from `E2B_VOLUME_API_URL`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}

/// One volume of a sandbox: which (by name) and where in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxVolumeMount {
    /// The name of a volume of the caller's team.
    pub name: String,
    /// Absolute path in the sandbox, e.g. `/mnt/data`.
    pub path: String,
}

/// What kind of filesystem object an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VolumeEntryType {
    File,
    Directory,
    Symlink,
    Unknown,
}

/// A file, directory or link in a volume (E2B `VolumeEntryStat`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VolumeEntryStat {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: VolumeEntryType,
    /// From the volume's root, e.g. `/dir/file.txt` (`/` for the root).
    pub path: String,
    pub size: u64,
    /// Permission bits (e.g. 420 for 0644), without the file type.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// RFC 3339.
    pub atime: String,
    pub mtime: String,
    pub ctime: String,
    /// A symlink's target, as stored (never followed by the content API).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// Body of `PATCH /volumecontent/{volumeID}/path`: what to change; absent fields stay.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeMetadataUpdate {
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
    /// Permission bits, 0 to 0o7777 (4095).
    #[serde(default)]
    pub mode: Option<u32>,
}
