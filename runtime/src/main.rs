fn main() {
    eprintln!("krun-oci: command line not wired yet");
    std::process::exit(1);
}
