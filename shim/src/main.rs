//! containerd-shim-krun-v2: the containerd runtime v2 shim of krun-oci.
//!
//! containerd starts it as `containerd-shim-krun-v2 -namespace NS -id ID
//! -address ADDR start`; the `containerd-shim` crate does the protocol (start,
//! delete, serving ttrpc, reaping children). This file only wires our Task
//! service ([`service::Service`]) into it.

mod error;
mod exits;
mod instance;
mod service;
mod stdio;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, DeleteResponse, ExitSignal, Flags, StartOpts};

/// The runtime name containerd users pass: `--runtime io.containerd.krun.v2`.
pub const RUNTIME_ID: &str = "io.containerd.krun.v2";

struct KrunShim {
    namespace: String,
    id: String,
    bundle: PathBuf,
    exit: Arc<ExitSignal>,
}

impl containerd_shim::Shim for KrunShim {
    type T = service::Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&args.bundle)
        };
        KrunShim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle,
            exit: Arc::new(ExitSignal::default()),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> Result<String, containerd_shim::Error> {
        // One shim per container (no grouping of pods yet).
        let grouping = opts.id.clone();
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        // The server removes its socket on shutdown by reading this file (in the bundle).
        containerd_shim::util::write_address(&address)?;
        Ok(address)
    }

    /// containerd runs `shim delete` when a shim vanished: remove what it left.
    fn delete_shim(&mut self) -> Result<DeleteResponse, containerd_shim::Error> {
        let root = service::state_root(&self.namespace);
        if let Ok(store) = krun_oci::state::StateStore::open(&root) {
            if let Err(e) = krun_oci::lifecycle::delete(&store, &self.id, true) {
                log::warn!("deleting {}: {e}", self.id);
            }
        }
        let rootfs = self.bundle.join("rootfs");
        if let Some(target) = rootfs.to_str() {
            let _ = containerd_shim::mount::umount_recursive(Some(target), libc::MNT_DETACH);
        }
        let d = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Ok(DeleteResponse {
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: containerd_shim::protos::protobuf::MessageField::some(
                containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp {
                    seconds: d.as_secs() as i64,
                    nanos: d.subsec_nanos() as i32,
                    ..Default::default()
                },
            ),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        service::Service::new(&self.namespace, publisher, self.exit.clone())
    }
}

fn main() {
    let args: Vec<_> = std::env::args_os().collect();
    // The crate leaves `-v` to us.
    if let Ok(flags) = containerd_shim::parse(&args[1..]) {
        if flags.version {
            println!("{}:", env!("CARGO_PKG_NAME"));
            println!("  Version:  {}", env!("CARGO_PKG_VERSION"));
            println!("  Runtime:  {RUNTIME_ID}");
            println!("  krun-oci: {}", service::krun_oci_binary().display());
            return;
        }
    }
    containerd_shim::run::<KrunShim>(RUNTIME_ID, None);
}
