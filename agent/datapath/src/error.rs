use std::{io, path::PathBuf};

/// Everything that can go wrong while loading or driving the datapath. Each variant names the
/// object involved so the agent can log the error as is.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The config handed to [`crate::Datapath::load`] or [`crate::Datapath::set_config`] is
    /// unusable.
    #[error("invalid datapath config: {0}")]
    InvalidConfig(String),

    /// An endpoint or network handed to an `upsert_*`/`remove_*` call is unusable; nothing was
    /// written. The message names the entry and what is wrong with it.
    #[error("invalid {0}")]
    InvalidEntry(String),

    /// The crate was built with `AYA_BUILD_SKIP`, so there is no eBPF object to load.
    #[error("this binary was built without the eBPF object (AYA_BUILD_SKIP was set)")]
    NoObject,

    /// The pin directory is not on a bpf filesystem, so maps cannot be pinned there.
    #[error(
        "{path} is not on a bpf filesystem; mount one (`mount -t bpf bpf /sys/fs/bpf`) or choose \
         a --bpf-dir under it"
    )]
    NotBpffs {
        /// The directory (or its nearest existing ancestor) that was checked.
        path: PathBuf,
    },

    /// A filesystem operation on the pin directory failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The embedded object could not be parsed (a build problem, not a kernel one).
    #[error("parsing the embedded eBPF object: {0}")]
    Object(#[source] aya_obj::ParseError),

    /// Creating or reusing the maps, or relocating the object, failed.
    #[error("loading the eBPF object with maps pinned under {bpf_dir}: {source}")]
    Load {
        /// The pin directory.
        bpf_dir: PathBuf,
        /// aya's error (includes the failing map). Boxed: aya's errors are large.
        #[source]
        source: Box<aya::EbpfError>,
    },

    /// The object lacks a program or map this crate expects (object and crate out of sync).
    #[error("the eBPF object has no {kind} named {name}")]
    Missing {
        /// "program" or "map".
        kind: &'static str,
        /// Its name.
        name: &'static str,
    },

    /// A program operation failed. For load failures the message contains the verifier log.
    #[error("program {name}: {source}")]
    Program {
        /// The program.
        name: &'static str,
        /// aya's error.
        #[source]
        source: Box<aya::programs::ProgramError>,
    },

    /// A map operation failed.
    #[error("map {name}: {source}")]
    Map {
        /// The map.
        name: &'static str,
        /// aya's error.
        #[source]
        source: Box<aya::maps::MapError>,
    },

    /// Attaching or detaching a program on an interface failed.
    #[error("{op} {program} on {ifname}: {source}")]
    Attach {
        /// "attaching" or "detaching".
        op: &'static str,
        /// The program.
        program: &'static str,
        /// The interface.
        ifname: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
}

impl DatapathError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn map(name: &'static str, source: aya::maps::MapError) -> Self {
        Self::Map {
            name,
            source: Box::new(source),
        }
    }

    pub(crate) fn program(name: &'static str, source: aya::programs::ProgramError) -> Self {
        Self::Program {
            name,
            source: Box::new(source),
        }
    }
}
