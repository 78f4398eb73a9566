//! krun-oci: an OCI runtime with a runc-compatible command line that runs every
//! container in its own microVM.

pub mod bundle;
pub mod cgroup;
pub mod check;
pub mod cli;
pub mod console;
pub mod container;
pub mod error;
pub mod exec;
pub mod fidelity;
pub mod guest;
pub mod hooks;
pub mod host_config;
pub mod image;
pub mod lifecycle;
pub mod logger;
pub mod logs;
pub mod monitor;
pub mod mounts;
pub mod network;
pub mod pool;
pub mod process_info;
pub mod seccomp;
pub mod signal;
pub mod spec;
pub mod state;
#[cfg(test)]
pub(crate) mod testutil;
pub mod vmm;

pub use error::{Error, Result};
