//! containerd-shim-krun-v2. The Task service is not built yet: the shim refuses
//! to run rather than pretending to work.
fn main() {
    eprintln!("containerd-shim-krun-v2: not implemented yet; use `ctr run --runtime io.containerd.runc.v2 --runc-binary $(command -v krun-oci)` meanwhile");
    std::process::exit(1);
}
