//! krun-oci: an OCI runtime with a runc-compatible command line that runs every
//! container in its own microVM.

pub mod error;
pub mod guest;
pub mod image;
pub mod vmm;

pub use error::{Error, Result};
