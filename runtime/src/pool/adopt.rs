//! The monitor's side of a pool hit: ask the daemon, claim the VM from its
//! member, and run it as [`AdoptedVm`], a [`Vm`] like any other.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use krun_oci_protocol as proto;
use nix::poll::{PollFd, PollFlags, PollTimeout};

use super::member::{BindEntry, Claimed, MemberReply, MemberRequest, MEMBER_TIMEOUT};
use super::{ask, wire, Reply, Request, Shape};
use crate::error::{Error, Result};
use crate::guest::GuestLink;
use crate::mounts::{DetachedTree, MountsShare};
use crate::vmm::{Vm, VmExit};

/// A claimed pooled VM, ready for `Setup`.
pub struct Adopted {
    pub vm: Box<dyn Vm>,
    pub events: UnixStream,
    pub timings: Vec<proto::BootTiming>,
    /// The spare NIC's tap, on its way into this process's network namespace.
    pub spare: Option<SpareTap>,
    /// Pids to move into the container's cgroup.
    pub pids: Vec<i32>,
    pub dirs: Vec<PathBuf>,
    pub member: String,
}

/// Asks `root`'s pool for a VM of `shape` and claims it with the container's
/// root and binds (and this process's network namespace when `netns`).
/// `Ok(None)`: no VM to be had (no daemon, a miss); `Err`: the claim failed.
/// Either way nothing is attached, and the caller boots cold.
pub fn claim(
    root: &Path,
    shape: &Shape,
    rootfs: &Path,
    mounts: Option<&MountsShare>,
    netns: bool,
) -> Result<Option<Adopted>> {
    if !super::PoolPaths::for_root(root).socket.exists() {
        return Ok(None);
    }
    let (member, socket) = match ask(
        root,
        &Request::Acquire {
            shape: shape.clone(),
        },
    ) {
        Ok(Reply::Hit { member, socket }) => (member, socket),
        Ok(Reply::Miss { reason }) => {
            log::info!("pool: miss ({reason})");
            return Ok(None);
        }
        Ok(other) => {
            return Err(Error::Pool(format!(
                "unexpected answer to acquire: {other:?}"
            )))
        }
        Err(e) => {
            log::info!("pool: {e}");
            return Ok(None);
        }
    };
    // Detached clones, made here, in the container's mount namespace.
    let root_tree = DetachedTree::clone_of(rootfs, true, false)?;
    let binds = mounts.map(|m| m.binds.as_slice()).unwrap_or_default();
    let trees = binds
        .iter()
        .map(|b| DetachedTree::clone_of(&b.source, b.recursive, b.readonly))
        .collect::<Result<Vec<_>>>()?;
    let netns_file = if netns {
        Some(
            File::open("/proc/thread-self/ns/net")
                .map_err(|e| Error::Pool(format!("opening our network namespace: {e}")))?,
        )
    } else {
        None
    };
    let (lifeline_r, lifeline_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut fds = vec![lifeline_r.as_fd(), root_tree.as_fd()];
    fds.extend(trees.iter().map(|t| t.as_fd()));
    fds.extend(netns_file.as_ref().map(|f| f.as_fd()));
    let request = MemberRequest::Claim {
        binds: binds
            .iter()
            .map(|b| BindEntry {
                entry: b.entry.clone(),
                is_dir: b.is_dir,
            })
            .collect(),
        netns,
    };
    let sock = wire::connect(&socket, MEMBER_TIMEOUT)?;
    wire::send(&sock, &request, &fds)?;
    drop(lifeline_r);
    let (reply, mut got) = wire::recv::<MemberReply>(&sock)?;
    let claimed = match reply {
        MemberReply::Claimed(c) => *c,
        MemberReply::Refused { reason } => {
            return Err(Error::Pool(format!(
                "member {member} refused the claim: {reason}"
            )))
        }
        other => {
            return Err(Error::Pool(format!(
                "unexpected answer to claim: {other:?}"
            )))
        }
    };
    if got.len() != 1 {
        return Err(Error::Pool(format!(
            "a claim answered with {} fds",
            got.len()
        )));
    }
    let events = UnixStream::from(got.remove(0));
    let Claimed {
        member_pid,
        helper_pids,
        link,
        console,
        timings,
        spare,
        dirs,
    } = claimed;
    let pidfd = crate::supervise::pidfd_open(member_pid)
        .ok_or_else(|| Error::Pool(format!("member {member} (pid {member_pid}) is gone")))?;
    let spare = spare.map(|claim| SpareTap {
        claim,
        member: sock,
        member_name: member.clone(),
    });
    let mut pids = vec![member_pid];
    pids.extend(helper_pids.iter().copied());
    Ok(Some(Adopted {
        vm: Box::new(AdoptedVm {
            link,
            pids: pids.clone(),
            console,
            pidfd,
            lifeline: Some(lifeline_w),
            exit: None,
        }),
        events,
        timings,
        spare,
        pids,
        dirs,
        member,
    }))
}

/// A claimed VM's spare tap, which its member moves into the claimant's
/// network namespace after answering the claim.
pub struct SpareTap {
    pub claim: crate::network::Claim,
    /// The claim's connection: `TapMoved` comes on it.
    member: OwnedFd,
    member_name: String,
}

impl SpareTap {
    /// Waits until the tap is in this process's network namespace.
    pub fn arrived(&self) -> Result<()> {
        match wire::recv::<MemberReply>(&self.member)?.0 {
            MemberReply::TapMoved => Ok(()),
            MemberReply::Refused { reason } => Err(Error::Network(reason)),
            other => Err(Error::Pool(format!(
                "member {}: unexpected answer for the spare tap: {other:?}",
                self.member_name
            ))),
        }
    }
}

/// A pooled VM run by its member process: the VM is gone when the member is.
pub struct AdoptedVm {
    link: GuestLink,
    /// The member's first, then the VMM's and its helpers'.
    pids: Vec<i32>,
    console: PathBuf,
    pidfd: OwnedFd,
    /// Closing it tells the member to end the VM.
    lifeline: Option<OwnedFd>,
    exit: Option<VmExit>,
}

/// How long the member gets to end the VM before it is killed.
const MEMBER_EXIT_GRACE: Duration = Duration::from_secs(5);

impl AdoptedVm {
    fn exited(&self, timeout_ms: u16) -> bool {
        let mut pfd = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
        matches!(nix::poll::poll(&mut pfd, PollTimeout::from(timeout_ms)), Ok(n) if n > 0)
    }
}

impl Vm for AdoptedVm {
    fn link(&self) -> GuestLink {
        self.link.clone()
    }

    fn pids(&self) -> Vec<i32> {
        self.pids.clone()
    }

    fn try_wait(&mut self) -> std::io::Result<Option<VmExit>> {
        if self.exit.is_none() && self.exited(0) {
            self.exit = Some(VmExit::Exited {
                component: "pool member".into(),
                status: None,
                signal: None,
            });
        }
        Ok(self.exit.clone())
    }

    fn kill(&mut self) {
        drop(self.lifeline.take());
        let deadline = Instant::now() + MEMBER_EXIT_GRACE;
        while !self.exited(50) {
            if Instant::now() > deadline {
                // SAFETY: pidfd_send_signal on our pidfd, no siginfo.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        self.pidfd.as_raw_fd(),
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    )
                };
                let _ = self.exited(1000);
                break;
            }
        }
        let _ = self.try_wait();
    }

    fn console_tail(&self, max: usize) -> String {
        crate::supervise::tail(&self.console, max)
    }
}

impl Drop for AdoptedVm {
    fn drop(&mut self) {
        self.kill();
    }
}
