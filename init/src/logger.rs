//! Init's own log: /dev/kmsg in a VM (falls back to the console), stderr in the
//! host-sandbox harness. Never the container's stdout: containers get pipes or a pty.

use std::fs::File;
use std::io::Write;
use std::sync::Mutex;

struct InitLogger {
    /// /dev/kmsg once devtmpfs is up; stderr before and in the sandbox harness.
    sink: Mutex<Option<File>>,
}

/// The kernel log level of a record: error 3, warning 4, info 5 (notice), else 7.
fn kmsg_level(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 3,
        log::Level::Warn => 4,
        log::Level::Info => 5,
        _ => 7,
    }
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
            // One write per record: /dev/kmsg takes one message per write, its
            // level as a `<N>` prefix.
            Some(f) => {
                let msg = format!("<{}>{line}", kmsg_level(record.level()));
                let _ = f.write_all(msg.as_bytes());
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

/// Sends further log lines to /dev/kmsg (once devtmpfs is mounted), and lets
/// the console show init's own info lines (the boot steps) next to the kernel's
/// errors: `quiet` hides everything below error, which left a boot that hangs
/// in init indistinguishable from one that hangs in the kernel. A `loglevel=`
/// on the kernel command line (a debugging aid, docs/vmm.md) is left as asked.
pub fn use_kmsg(cmdline: &str) {
    if let Ok(f) = std::fs::OpenOptions::new().write(true).open("/dev/kmsg") {
        *LOGGER.sink.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
        // By default the kernel keeps 10 lines per 5 s of each /dev/kmsg opener's,
        // and a boot's steps alone are about that many: the setup's lines and any
        // warning after them were dropped (a pooled VM's always). The limit is per
        // open file: it never bounded a writer that reopens /dev/kmsg.
        // (The kernel takes the value with its newline only.)
        if !cmdline.contains("printk.devkmsg=") {
            let _ = std::fs::write("/proc/sys/kernel/printk_devkmsg", "on\n");
        }
        if cmdline
            .split_whitespace()
            .any(|w| w.starts_with("loglevel="))
        {
            return;
        }
        // console_loglevel 6: levels 0..=5 (error, warning, notice) reach the console.
        let _ = std::fs::write("/proc/sys/kernel/printk", "6");
        CONSOLE_RAISED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Whether [`use_kmsg`] raised the console's log level (not asked otherwise).
static CONSOLE_RAISED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Boot is over: from here on only warnings and errors reach the console, info
/// lines stay in the guest's kernel log. Each console line is port I/O per byte,
/// emulated: ~0.3-0.5 ms a line under TCG, and the info lines after boot ("main
/// process started", the setup steps) sat on a pool hit's `create` and `start`.
pub fn quiet_console() {
    if CONSOLE_RAISED.load(std::sync::atomic::Ordering::Relaxed) {
        // console_loglevel 5: levels 0..=4 (error, warning).
        let _ = std::fs::write("/proc/sys/kernel/printk", "5");
    }
}
