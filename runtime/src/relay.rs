//! What every host relay of a guest process does, one way for the VM monitor
//! (the main) and the exec relays: stdin into the guest within its window,
//! signals and terminal resizes forwarded by one policy
//! ([`crate::signal::relayed_signals`]), a local terminal in raw mode.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use krun_oci_protocol::{self as proto, Frame};

/// The host's side of the stdin flow control: at most [`proto::STDIN_WINDOW`]
/// bytes sent and not yet acknowledged by the guest.
#[derive(Debug, Default)]
pub struct StdinWindow {
    in_flight: Mutex<usize>,
    changed: std::sync::Condvar,
}

impl StdinWindow {
    /// Blocks until `n` more bytes fit in the window.
    fn acquire(&self, n: usize) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        while *in_flight > 0 && *in_flight + n > proto::STDIN_WINDOW {
            in_flight = self
                .changed
                .wait(in_flight)
                .unwrap_or_else(|e| e.into_inner());
        }
        *in_flight += n;
    }

    /// The guest consumed `n` bytes.
    pub fn release(&self, n: usize) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        *in_flight = in_flight.saturating_sub(n);
        self.changed.notify_all();
    }
}

/// Copies `input` into Stdin frames (within the guest's window) until EOF, then
/// sends StdinClose.
pub fn spawn_input_pump(input: OwnedFd, writer: Arc<Mutex<UnixStream>>, window: Arc<StdinWindow>) {
    std::thread::spawn(move || {
        let mut input = File::from(input);
        let mut buf = vec![0u8; proto::STDIN_WINDOW / 2];
        loop {
            let frame = match input.read(&mut buf) {
                Ok(0) | Err(_) => Frame::StdinClose,
                Ok(n) => {
                    window.acquire(n);
                    Frame::Stdin(buf[..n].to_vec())
                }
            };
            let last = frame == Frame::StdinClose;
            let sent = writer
                .lock()
                .map(|mut w| proto::write_frame(&mut *w, &frame).is_ok())
                .unwrap_or(false);
            if last || !sent {
                return;
            }
        }
    });
}

/// What a relay passes on to its guest process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    Signal(i32),
    /// SIGWINCH, as the terminal's new size.
    Resize {
        rows: u16,
        cols: u16,
    },
}

/// Forwards every signal of [`crate::signal::relayed_signals`] that reaches this
/// process, from a thread, through `deliver`; SIGWINCH becomes the new size of
/// `tty` (and is dropped without one).
pub fn forward_signals(tty: Option<OwnedFd>, mut deliver: impl FnMut(Forward) + Send + 'static) {
    let mut signals = match signal_hook::iterator::Signals::new(crate::signal::relayed_signals()) {
        Ok(s) => s,
        Err(e) => {
            log::warn!("cannot forward signals: {e}");
            return;
        }
    };
    std::thread::spawn(move || {
        for sig in signals.forever() {
            let forward = match sig {
                libc::SIGWINCH => match tty.as_ref().and_then(crate::console::window_size) {
                    Some((rows, cols)) => Forward::Resize { rows, cols },
                    None => continue,
                },
                sig => Forward::Signal(sig),
            };
            deliver(forward);
        }
    });
}

/// Puts a terminal in raw mode for the life of the guard.
pub struct RawMode {
    fd: OwnedFd,
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    pub fn enable(fd: &impl AsFd) -> Option<Self> {
        use nix::sys::termios;
        let saved = termios::tcgetattr(fd).ok()?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(fd, termios::SetArg::TCSANOW, &raw).ok()?;
        Some(Self {
            fd: fd.as_fd().try_clone_to_owned().ok()?,
            saved,
        })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ =
            nix::sys::termios::tcsetattr(&self.fd, nix::sys::termios::SetArg::TCSANOW, &self.saved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_blocks_until_the_guest_acknowledges() {
        let w = Arc::new(StdinWindow::default());
        w.acquire(proto::STDIN_WINDOW);
        let (tx, rx) = std::sync::mpsc::channel();
        let w2 = w.clone();
        std::thread::spawn(move || {
            w2.acquire(1);
            tx.send(()).unwrap();
        });
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(100))
            .is_err());
        w.release(proto::STDIN_WINDOW);
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
    }
}
