//! Bringing a VM up to Ready, as the monitor's cold boot and a pool member's
//! boot both do: the image options, the host side of the events socket, the
//! guest's ready beacon. Neither the monitor nor the pool: both depend on it.

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use krun_oci_protocol::{self as proto, Message};

use crate::error::{Error, IoContext, Result};
use crate::guest::GuestLink;
use crate::vmm::{Vm, VmmChoice};

/// How long a boot waits for the guest's ready beacon after launching the VM (the
/// guest image is built before). A TCG boot takes 1-3 s, under heavy load ~10 s; a
/// boot that has not answered in 2 minutes is stuck, and create fails with the
/// console's tail (which shows guest-init's boot steps) while the caller still
/// waits, rather than after a client's own timeout. The VM dying ends the wait at once.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Image options for a container: libkrun boots only our own kernel (or
/// libkrunfw), so when libkrun is asked for, or `auto` would pick it (hardware
/// KVM and our kernel built), the automatic kernel choice is our own.
pub fn image_options(vmm: VmmChoice) -> Result<crate::image::ImageOptions> {
    use crate::image::{own_kernel, KernelSource};
    let mut opts = crate::image::ImageOptions::from_env()?;
    if opts.kernel_source == KernelSource::Auto && opts.kernel.is_none() {
        let libkrun = match vmm {
            VmmChoice::Libkrun => true,
            VmmChoice::Qemu | VmmChoice::Sandbox => false,
            VmmChoice::Auto => {
                crate::vmm::detect::assess_kvm(&crate::vmm::detect::HostFacts::probe()).usable
                    && own_kernel::cached(&opts.cache_dir()).is_some()
            }
        };
        if libkrun {
            opts.kernel_source = KernelSource::Own;
        }
    }
    Ok(opts)
}

/// Binds the host side of the guest's events port (its ready beacon lands there).
pub(crate) fn bind_events(link: &GuestLink) -> Result<UnixListener> {
    let events_path = link.host_port_path(proto::HOST_EVENTS_PORT);
    let _ = std::fs::remove_file(&events_path);
    UnixListener::bind(&events_path).ctx(|| format!("binding {}", events_path.display()))
}

/// Waits for the guest's beacon, then the handshake and its `Ready`.
pub(crate) fn await_ready(
    listener: &UnixListener,
    vm: &mut dyn Vm,
) -> Result<(UnixStream, Vec<proto::BootTiming>)> {
    let mut events = accept_beacon(listener, vm)?;
    proto::handshake(&mut events)?;
    match proto::recv(&mut events)? {
        Message::Ready { timings, .. } => Ok((events, timings)),
        other => Err(Error::Guest(format!(
            "expected ready, got {}",
            crate::guest::brief(&other)
        ))),
    }
}

/// Waits for the guest's connection on the events port, bounded by VM liveness.
fn accept_beacon(listener: &UnixListener, vm: &mut dyn Vm) -> Result<UnixStream> {
    listener
        .set_nonblocking(true)
        .ctx(|| "events listener".into())?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).ctx(|| "events stream".into())?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e).ctx(|| "accepting the guest's beacon".into()),
        }
        if let Some(exit) = vm.try_wait().ctx(|| "checking the VM".into())? {
            return Err(Error::Vm(format!(
                "the VM stopped before the guest was ready: {exit:?}"
            )));
        }
        if Instant::now() > deadline {
            return Err(Error::Vm(format!(
                "the guest was not ready within {}s",
                READY_TIMEOUT.as_secs()
            )));
        }
        let fd = listener.as_raw_fd();
        let mut pfd = [nix::poll::PollFd::new(
            // SAFETY: the listener outlives this poll.
            unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
            nix::poll::PollFlags::POLLIN,
        )];
        let _ = nix::poll::poll(&mut pfd, nix::poll::PollTimeout::from(20u16));
    }
}
