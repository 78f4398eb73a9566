//! krun-oci: an OCI runtime with a runc-compatible command line that runs every
//! container in its own microVM.

pub mod boot;
pub(crate) mod bundle;
pub(crate) mod cgroup;
pub mod check;
pub mod cli;
pub mod console;
pub mod container;
pub mod error;
pub mod exec;
pub(crate) mod fidelity;
pub mod guest;
pub(crate) mod hooks;
pub mod host_config;
pub mod image;
pub mod lifecycle;
pub mod logger;
pub mod logs;
pub mod monitor;
pub(crate) mod mounts;
pub(crate) mod network;
pub mod pool;
pub(crate) mod relay;
pub(crate) mod seccomp;
pub mod signal;
pub(crate) mod spares;
pub mod spec;
pub mod state;
pub(crate) mod supervise;
#[cfg(test)]
pub(crate) mod testutil;
pub mod vmm;

pub use error::{Error, Result};
