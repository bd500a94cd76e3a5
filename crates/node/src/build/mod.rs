//! Template builds from the API: an E2B `Template` (a parent, steps, a start and a ready command)
//! turned into a template of this host, with every step run inside a builder microVM, never on
//! the host. The contract between the API (which owns build records, logs, uploads and tags) and
//! the node (which owns VMs, the layer cache and template files) is [`spec`] (the
//! `alcove-build-spec` crate).

/// The contract types, shared with the API (`alcove-build-spec`).
pub mod spec {
    pub use alcove_build_spec::*;
}

pub use spec::{
    BuildFailure, BuildFrom, BuildLog, BuildLogEntry, BuildSpec, BuiltTemplate, ImageRegistry,
    LogLevel, Step, StepKind, StepRef,
};
