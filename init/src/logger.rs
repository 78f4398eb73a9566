//! Init's own log: /dev/kmsg in a VM (falls back to the console), stderr in the
//! host-sandbox harness. Never the container's stdout: containers get pipes or a pty.

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;

struct InitLogger {
    sink: Mutex<Option<File>>,
}

static LOGGER: InitLogger = InitLogger {
    sink: Mutex::new(None),
};

impl log::Log for InitLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        let line = format!("krun-oci-init: {}: {}\n", record.level(), record.args());
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        match sink.as_mut() {
            // One write per record: /dev/kmsg takes one message per write.
            Some(f) => {
                let _ = f.write_all(line.as_bytes());
            }
            None => {
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

/// Installs the logger (writing to stderr until [`use_kmsg`] is called).
pub fn init() {
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
}

/// Sends further log lines to /dev/kmsg (once devtmpfs is mounted).
pub fn use_kmsg() {
    if let Ok(f) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        *LOGGER.sink.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }
}
