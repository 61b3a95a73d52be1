//! netlab: the end-to-end test lab of DESIGN.md section 8.
//!
//! A lab is, for a per-run prefix `P` (e.g. `nl3f2a1`):
//!
//! ```text
//!   P-fabric   bridge br0 198.18.0.1/24 (+ 198.18.0.2, where etcd listens)
//!     |-- n1 <veth> eth0 198.18.0.11/24  in P-n1   netagent --node-name n1 ...
//!     |-- n2 <veth> eth0 198.18.0.12/24  in P-n2   netagent --node-name n2 ...
//!     `-- ...
//! ```
//!
//! Run files live in `/run/netlab/P/` (sockets `nI.sock`, logs `nI.log`,
//! state dirs, etcd's data, pid files), pins under `/sys/fs/bpf/P/nI`.
//! Nothing is created in the root network namespace and nothing routes to
//! the lab from it. Dropping the [`Lab`] removes all of it, also when a test
//! panics; [`Lab::down`] and [`Lab::down_all`] do the same from another
//! process, and a lab whose owning process died is removed by the next
//! [`Lab::up`].
//!
//! Do not keep a `Lab` in a `static`: statics are never dropped, so the lab
//! would outlive the test run.

mod bins;
mod cmd;
mod lab;
mod layout;
mod record;
mod status;
mod sys;
mod teardown;

pub use cmd::{Background, Output, describe, run, run_inherit, spawn};
pub use lab::{Lab, LabConfig, StoreKind};
pub use layout::{
    ETCD_ADDR, ETCD_PORT, FABRIC_GATEWAY, FABRIC_PREFIX_LEN, MAX_NODES, OUTSIDE_ADDR,
    OUTSIDE_GATEWAY, RUN_ROOT, UPLINK, generate_prefix, validate_prefix,
};
pub use nix::sys::signal::Signal;
pub use record::{Owner, Record};
pub use status::{LabStatus, NodeStatus, ProcStatus};
pub use sys::{BPFFS, NETNS_DIR, ensure_bpffs, is_alive, is_root, list_netns};
