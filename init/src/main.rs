fn main() {
    eprintln!("krun-oci-init: not implemented yet");
    std::process::exit(1);
}
