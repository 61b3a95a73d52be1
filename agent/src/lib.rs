//! netagent: the per-node agent of the overlay network.
//!
//! Concerns, each in its own module: `model` (cluster objects and validation), `networks` and
//! `nodes` (those objects in the store), `view` (the watched in-memory cluster view), `api`
//! (HTTP on a unix socket), and `agent` (wiring them together for one node).

pub mod agent;
pub mod api;
pub mod capacity;
pub mod containers;
pub mod dns;
pub mod error;
#[doc(hidden)]
pub mod fixtures;
pub mod metrics;
pub mod model;
pub mod monitor;
pub mod netlink;
pub mod networks;
pub mod nodes;
pub mod orchestrator;
pub mod reconcile;
pub mod runner;
pub mod runtime;
pub mod sandbox;
pub mod sd_notify;
pub mod secrets;
pub mod services;
pub mod tunnels;
pub mod view;
