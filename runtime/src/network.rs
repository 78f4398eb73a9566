//! The container's network namespace reaching the guest (docs/network.md).
//!
//! Kata's `tcfilter` model: the VM monitor, already inside the network namespace
//! that `linux.namespaces[network].path` names, gives the VM one NIC per link
//! of that namespace that is up and has addresses. For each such link it makes a
//! tap (vnet header, the link's MTU), adds an `ingress` qdisc on both and a u32
//! filter `match u8 0 0 action mirred egress redirect` each way, so every frame
//! that arrives on the link leaves through the tap into the guest and back. The
//! guest NIC carries the link's MAC; its addresses and routes go to guest-init in
//! `Setup` ([`krun_oci_protocol::net`]). Port publishing needs nothing more: a
//! DNAT onto the link's address lands on the link and is redirected.
//!
//! What was changed is recorded in the container dir before it is changed
//! ([`NETWORK_RECORD`]), so the monitor's exit, a failed create and `delete`
//! (even after the monitor was killed) undo exactly that.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures_util::TryStreamExt;
use krun_oci_protocol::net::{format_mac, IpPrefix, NetInterface, NetRoute};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteMetric, RouteProtocol, RouteType,
};
use netlink_packet_route::tc::{TcAttribute, TcHandle};
use oci_spec::runtime::{LinuxNamespaceType, Spec};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

/// Annotation that forces a network mode: `auto` (default), `tap`, `none`.
pub const ANNOTATION_NETWORK: &str = "krun-oci.network";
/// The record of what was attached, in the container dir.
pub const NETWORK_RECORD: &str = "network.json";
/// Name prefix of our taps (`krtap0`, `krtap1`, ...): never attached themselves.
pub const TAP_PREFIX: &str = "krtap";
/// The main routing table (`RT_TABLE_MAIN`).
const MAIN_TABLE: u32 = 254;

/// How the container's network reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// Attach the namespace's links when the config names a namespace path,
    /// loopback only otherwise.
    #[default]
    Auto,
    /// Attach the namespace's links; an error when there is no namespace path
    /// or nothing to attach.
    Tap,
    /// No NIC, loopback only.
    None,
}

impl NetworkMode {
    pub const VALUES: [&'static str; 3] = ["auto", "tap", "none"];

    pub fn parse(s: &str) -> Result<NetworkMode> {
        match s {
            "auto" => Ok(NetworkMode::Auto),
            "tap" => Ok(NetworkMode::Tap),
            "none" => Ok(NetworkMode::None),
            other => Err(Error::InvalidInput(format!(
                "annotation {ANNOTATION_NETWORK}={other:?}: expected one of {}",
                Self::VALUES.join(", ")
            ))),
        }
    }
}

/// What create decided for the container's network (handed to the monitor).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Plan {
    /// Attach the links of the namespace the monitor joins (`netns`).
    Attach { netns: PathBuf, required: bool },
    /// No NIC: the guest has loopback only.
    #[default]
    LoopbackOnly,
}

/// The plan for a config, and a warning for the user where the container will
/// have less network than it would have with runc.
pub fn plan(spec: &Spec) -> Result<(Plan, Option<String>)> {
    let mode = match spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_NETWORK))
    {
        Some(v) => NetworkMode::parse(v)?,
        None => NetworkMode::Auto,
    };
    let netns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|ns| ns.iter().find(|n| n.typ() == LinuxNamespaceType::Network));
    Ok(match (mode, netns.map(|n| n.path().clone())) {
        (NetworkMode::None, _) => (Plan::LoopbackOnly, None),
        (mode, Some(Some(path))) => (
            Plan::Attach {
                netns: path,
                required: mode == NetworkMode::Tap,
            },
            None,
        ),
        (NetworkMode::Tap, _) => {
            return Err(Error::InvalidInput(format!(
                "{ANNOTATION_NETWORK}=tap needs linux.namespaces to name a network namespace path"
            )))
        }
        // A new, empty namespace (`runc spec`'s default): loopback only, as with runc.
        (NetworkMode::Auto, Some(None)) => (Plan::LoopbackOnly, None),
        (NetworkMode::Auto, None) => (
            Plan::LoopbackOnly,
            Some(
                "no network namespace in the config (host network): the host's network cannot \
                 cross into a microVM, the container gets loopback only"
                    .into(),
            ),
        ),
    })
}

/// One link handed to the VM: recorded before anything is changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub link: String,
    pub link_index: u32,
    pub tap: String,
}

/// One NIC of the VM: the tap (open, for QEMU's `fd=`; by name for libkrun) and
/// what the guest device carries.
#[derive(Debug, Clone)]
pub struct Nic {
    pub tap: Arc<OwnedFd>,
    pub tap_name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
}

/// What [`attach`] made.
#[derive(Debug, Default)]
pub struct Attached {
    pub nics: Vec<Nic>,
    /// What guest-init configures, one per NIC.
    pub interfaces: Vec<NetInterface>,
}

/// Attaches the current network namespace's links (the monitor has joined the
/// plan's namespace). `persistent_taps`: for libkrun, which opens the tap by
/// name. On error everything made so far is undone.
pub fn attach(plan: &Plan, record: &Path, persistent_taps: bool) -> Result<Attached> {
    let Plan::Attach { netns, required } = plan else {
        return Ok(Attached::default());
    };
    let mut claims = Vec::new();
    let result = block_on(attach_links(record, persistent_taps, &mut claims));
    let attached = match result {
        Ok(a) => a,
        Err(e) => {
            let _ = block_on(undo(&claims));
            let _ = std::fs::remove_file(record);
            return Err(e);
        }
    };
    if attached.nics.is_empty() {
        let why = format!(
            "network namespace {} has no up interface with addresses that is not already attached",
            netns.display()
        );
        if *required {
            return Err(Error::Network(why));
        }
        log::warn!("{why}: the guest gets loopback only");
    }
    Ok(attached)
}

async fn attach_links(
    record: &Path,
    persistent_taps: bool,
    claims: &mut Vec<Claim>,
) -> Result<Attached> {
    let handle = connect()?;
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing links"))?;
    let addresses: Vec<AddressMessage> = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing addresses"))?;
    let routes = list_routes(&handle).await?;
    let mut out = Attached::default();
    for link in &links {
        let Some(candidate) = Candidate::from_link(link, &addresses) else {
            continue;
        };
        let tap_name = format!("{TAP_PREFIX}{}", out.nics.len());
        let claim = Claim {
            link: candidate.name.clone(),
            link_index: candidate.index,
            tap: tap_name.clone(),
        };
        claims.push(claim);
        write_record(record, claims)?;
        // The link's own ingress qdisc is the claim: a second VM's add fails.
        match add_ingress(&handle, candidate.index).await {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {
                log::warn!(
                    "{}: it already has an ingress qdisc (another VM's?); not attached",
                    candidate.name
                );
                claims.pop();
                write_record(record, claims)?;
                continue;
            }
            Err(e) => return Err(nl(format!("ingress qdisc on {}", candidate.name))(e)),
        }
        let tap = open_tap(&tap_name, persistent_taps)?;
        let tap_index = link_index(&handle, &tap_name).await?;
        handle
            .link()
            .set(
                rtnetlink::LinkUnspec::new_with_index(tap_index)
                    .mtu(candidate.mtu)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(nl(format!("bringing {tap_name} up")))?;
        add_ingress(&handle, tap_index)
            .await
            .map_err(nl(format!("ingress qdisc on {tap_name}")))?;
        redirect(&handle, candidate.index, tap_index)
            .await
            .map_err(nl(format!("redirect {} -> {tap_name}", candidate.name)))?;
        redirect(&handle, tap_index, candidate.index)
            .await
            .map_err(nl(format!("redirect {tap_name} -> {}", candidate.name)))?;
        log::info!(
            "network: {} ({}, mtu {}) -> {tap_name}",
            candidate.name,
            format_mac(&candidate.mac),
            candidate.mtu
        );
        out.interfaces.push(NetInterface {
            name: candidate.name.clone(),
            mac: format_mac(&candidate.mac),
            mtu: candidate.mtu,
            addresses: candidate.addresses.clone(),
            routes: routes_of(&routes, candidate.index),
        });
        out.nics.push(Nic {
            tap: Arc::new(tap),
            tap_name,
            mac: candidate.mac,
            mtu: candidate.mtu,
        });
    }
    Ok(out)
}

/// A link worth attaching.
struct Candidate {
    index: u32,
    name: String,
    mac: [u8; 6],
    mtu: u32,
    addresses: Vec<IpPrefix>,
}

impl Candidate {
    /// Up, not loopback, not one of our taps, an Ethernet MAC, and addresses.
    fn from_link(link: &LinkMessage, addresses: &[AddressMessage]) -> Option<Candidate> {
        let flags = link.header.flags;
        if flags.contains(LinkFlags::Loopback) || !flags.contains(LinkFlags::Up) {
            return None;
        }
        let mut name = None;
        let mut mac = None;
        let mut mtu = 1500;
        for a in &link.attributes {
            match a {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::Address(m) => mac = <[u8; 6]>::try_from(m.as_slice()).ok(),
                LinkAttribute::Mtu(m) => mtu = *m,
                _ => {}
            }
        }
        let name = name.filter(|n| !n.starts_with(TAP_PREFIX))?;
        let index = link.header.index;
        let addresses: Vec<IpPrefix> = addresses
            .iter()
            .filter(|a| a.header.index == index)
            .filter_map(address_of)
            .collect();
        if addresses.is_empty() {
            return None;
        }
        Some(Candidate {
            index,
            name,
            mac: mac?,
            mtu,
            addresses,
        })
    }
}

/// An address as guest-init adds it. IPv6 link-local addresses are left to the
/// guest's kernel, which derives the same one from the same MAC.
fn address_of(a: &AddressMessage) -> Option<IpPrefix> {
    let mut local = None;
    let mut address = None;
    for attr in &a.attributes {
        match attr {
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    // IFA_LOCAL is the interface's own address on IPv4 (IFA_ADDRESS may be a peer).
    let addr = local.or(address)?;
    if let IpAddr::V6(v6) = addr {
        if (v6.segments()[0] & 0xffc0) == 0xfe80 {
            return None;
        }
    }
    Some(IpPrefix {
        addr,
        prefix_len: a.header.prefix_len,
    })
}

async fn list_routes(handle: &rtnetlink::Handle) -> Result<Vec<RouteMessage>> {
    let mut all = Vec::new();
    for msg in [
        rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build(),
        rtnetlink::RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let mut got: Vec<RouteMessage> = handle
            .route()
            .get(msg)
            .execute()
            .try_collect()
            .await
            .map_err(nl("listing routes"))?;
        all.append(&mut got);
    }
    Ok(all)
}

/// The routes guest-init adds for link `index`: main table, unicast, not the
/// kernel's own; link routes before gateway routes (a gateway needs its link route).
fn routes_of(routes: &[RouteMessage], index: u32) -> Vec<NetRoute> {
    let mut out: Vec<NetRoute> = routes.iter().filter_map(|r| route_of(r, index)).collect();
    out.sort_by_key(|r| r.gateway.is_some());
    out
}

fn route_of(r: &RouteMessage, index: u32) -> Option<NetRoute> {
    let h = &r.header;
    if h.kind != RouteType::Unicast || h.protocol == RouteProtocol::Kernel {
        return None;
    }
    let mut table = u32::from(h.table);
    let mut oif = None;
    let mut destination = None;
    let mut gateway = None;
    let mut priority = None;
    let mut mtu = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Destination(d) => destination = ip_of(d),
            RouteAttribute::Gateway(g) => gateway = ip_of(g),
            RouteAttribute::Priority(p) => priority = Some(*p),
            RouteAttribute::Metrics(ms) => {
                for m in ms {
                    if let RouteMetric::Mtu(v) = m {
                        mtu = Some(*v);
                    }
                }
            }
            _ => {}
        }
    }
    if table != MAIN_TABLE || oif != Some(index) {
        return None;
    }
    let destination = match destination {
        Some(addr) => Some(IpPrefix {
            addr,
            prefix_len: h.destination_prefix_length,
        }),
        None if h.destination_prefix_length == 0 => None,
        None => return None,
    };
    if destination.is_none() && gateway.is_none() {
        // A default route straight onto the link ("default dev eth0").
        let addr = match h.address_family {
            netlink_packet_route::AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            _ => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        };
        return Some(NetRoute {
            destination: Some(IpPrefix {
                addr,
                prefix_len: 0,
            }),
            gateway: None,
            mtu,
            priority,
            onlink: false,
        });
    }
    Some(NetRoute {
        destination,
        gateway,
        mtu,
        priority,
        onlink: h.flags.contains(RouteFlags::Onlink),
    })
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

async fn link_index(handle: &rtnetlink::Handle, name: &str) -> Result<u32> {
    let link = handle
        .link()
        .get()
        .match_name(name.to_string())
        .execute()
        .try_next()
        .await
        .map_err(nl(format!("looking up {name}")))?;
    link.map(|l| l.header.index)
        .ok_or_else(|| Error::Network(format!("{name} vanished")))
}

async fn add_ingress(
    handle: &rtnetlink::Handle,
    index: u32,
) -> std::result::Result<(), rtnetlink::Error> {
    handle.qdisc().add(index as i32).ingress().execute().await
}

/// `tc filter add dev FROM parent ffff: protocol all u32 match u8 0 0 action
/// mirred egress redirect dev TO`.
async fn redirect(
    handle: &rtnetlink::Handle,
    from: u32,
    to: u32,
) -> std::result::Result<(), rtnetlink::Error> {
    handle
        .traffic_filter(from as i32)
        .add()
        .parent(TcHandle::INGRESS.into())
        // The protocol field is in network byte order (what `tc ... protocol all` sends).
        .protocol((libc::ETH_P_ALL as u16).to_be())
        .redirect(to)?
        .execute()
        .await
}

/// Undoes `claims` in the current network namespace: the link's ingress qdisc
/// (which holds our filter) and the tap. What is already gone is skipped.
async fn undo(claims: &[Claim]) -> Result<()> {
    let handle = connect()?;
    let mut first_error = None;
    for c in claims {
        // Only if the index still names the link we claimed.
        let link = handle
            .link()
            .get()
            .match_index(c.link_index)
            .execute()
            .try_next()
            .await
            .ok()
            .flatten();
        let same = link.is_some_and(|l| {
            l.attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::IfName(n) if *n == c.link))
        });
        if same {
            if let Err(e) = del_ingress(&handle, c.link_index).await {
                if !is_gone(&e) {
                    first_error
                        .get_or_insert(nl(format!("removing {}'s ingress qdisc", c.link))(e));
                }
            }
        }
        if let Ok(index) = link_index(&handle, &c.tap).await {
            if let Err(e) = handle.link().del(index).execute().await {
                if !is_gone(&e) {
                    first_error.get_or_insert(nl(format!("removing {}", c.tap))(e));
                }
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

async fn del_ingress(
    handle: &rtnetlink::Handle,
    index: u32,
) -> std::result::Result<(), rtnetlink::Error> {
    let mut req = handle.qdisc().del(index as i32);
    let msg = req.message_mut();
    msg.header.parent = TcHandle::INGRESS;
    msg.header.handle = TcHandle::from(0xffff_0000);
    msg.attributes.push(TcAttribute::Kind("ingress".into()));
    req.execute().await
}

fn is_gone(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m)
        if [-libc::ENODEV, -libc::ENOENT, -libc::EINVAL].contains(&m.raw_code()))
}

/// Undoes what `record` lists in the current network namespace and removes the
/// record. Called by the monitor as it exits (it lives in the namespace).
pub fn release(record: &Path) -> Result<()> {
    let claims = match read_record(record)? {
        Some(c) => c,
        None => return Ok(()),
    };
    block_on(undo(&claims))?;
    let _ = std::fs::remove_file(record);
    Ok(())
}

/// [`release`] from outside the namespace (delete, after a monitor that was
/// killed): joins `netns` on a thread of its own. A namespace that is already
/// gone took our taps and qdiscs with it.
pub fn release_in(record: &Path, netns: &Path) -> Result<()> {
    if !record.exists() {
        return Ok(());
    }
    let netns_file = match File::open(netns) {
        Ok(f) => f,
        Err(_) => {
            let _ = std::fs::remove_file(record);
            return Ok(());
        }
    };
    let record = record.to_owned();
    std::thread::spawn(move || -> Result<()> {
        nix::sched::setns(&netns_file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| Error::Network(format!("joining the network namespace: {e}")))?;
        release(&record)
    })
    .join()
    .map_err(|_| Error::Network("the network release thread panicked".into()))?
}

fn read_record(record: &Path) -> Result<Option<Vec<Claim>>> {
    match std::fs::read(record) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).ctx(|| format!("reading {}", record.display())),
    }
}

fn write_record(record: &Path, claims: &[Claim]) -> Result<()> {
    crate::state::write_atomic(record, &serde_json::to_vec(claims)?)
        .ctx(|| format!("writing {}", record.display()))
}

/// Opens `/dev/net/tun` as tap `name` (vnet header, no packet info). A
/// non-persistent tap vanishes with its last fd; a persistent one (libkrun opens
/// it again by name) is removed by [`release`].
fn open_tap(name: &str, persistent: bool) -> Result<OwnedFd> {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .ctx(|| "opening /dev/net/tun".into())?;
    // SAFETY: ifreq is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *d = *s as libc::c_char;
    }
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq we own, on the fd we own.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error()).ctx(|| format!("creating tap {name}"));
    }
    if persistent {
        // SAFETY: TUNSETPERSIST takes an integer argument.
        if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
            return Err(std::io::Error::last_os_error())
                .ctx(|| format!("making tap {name} persistent"));
        }
    }
    // SAFETY: into_raw_fd hands over ownership of a valid fd.
    Ok(unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(tun)) })
}

fn connect() -> Result<rtnetlink::Handle> {
    let (connection, handle, _) =
        rtnetlink::new_connection().ctx(|| "opening a netlink socket".into())?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Runs one netlink conversation on a current-thread runtime (no threads: the
/// monitor and guest-init stay single-purpose; the socket lives in the calling
/// thread's network namespace).
fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .ctx(|| "starting the netlink runtime".into())?
        .block_on(f)
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> Error {
    let what = what.into();
    move |e| Error::Network(format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> Spec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn plans_from_the_config() {
        let with_path = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"namespaces": [{"type": "network", "path": "/run/netns/x"}]}
        }));
        assert_eq!(
            plan(&with_path).unwrap(),
            (
                Plan::Attach {
                    netns: "/run/netns/x".into(),
                    required: false
                },
                None
            )
        );
        let fresh = spec(serde_json::json!({
            "ociVersion": "1.0.2",
            "linux": {"namespaces": [{"type": "network"}]}
        }));
        assert_eq!(plan(&fresh).unwrap(), (Plan::LoopbackOnly, None));
        let host = spec(serde_json::json!({"ociVersion": "1.0.2", "linux": {}}));
        let (p, warning) = plan(&host).unwrap();
        assert_eq!(p, Plan::LoopbackOnly);
        assert!(warning.unwrap().contains("host network"));
    }

    #[test]
    fn the_annotation_forces_a_mode() {
        let forced = |mode: &str, ns: serde_json::Value| {
            plan(&spec(serde_json::json!({
                "ociVersion": "1.0.2",
                "annotations": {ANNOTATION_NETWORK: mode},
                "linux": {"namespaces": ns}
            })))
        };
        let with_path = serde_json::json!([{"type": "network", "path": "/run/netns/x"}]);
        assert_eq!(
            forced("none", with_path.clone()).unwrap(),
            (Plan::LoopbackOnly, None)
        );
        assert!(matches!(
            forced("tap", with_path).unwrap().0,
            Plan::Attach { required: true, .. }
        ));
        let e = forced("tap", serde_json::json!([{"type": "network"}])).unwrap_err();
        assert!(e.to_string().contains("network namespace path"), "{e}");
        let e = forced("bridge", serde_json::json!([])).unwrap_err();
        assert!(e.to_string().contains("auto, tap, none"), "{e}");
    }

    fn route(json: serde_json::Value) -> RouteMessage {
        // Built field by field: RouteMessage has no serde; the JSON keeps the
        // cases readable.
        let mut r = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build();
        if let Some(t) = json.get("table") {
            r.header.table = t.as_u64().unwrap() as u8;
        }
        if json.get("kernel").is_some() {
            r.header.protocol = RouteProtocol::Kernel;
        }
        if let Some(d) = json.get("dst") {
            let (a, p) = d.as_str().unwrap().split_once('/').unwrap();
            r.header.destination_prefix_length = p.parse().unwrap();
            r.attributes
                .push(RouteAttribute::Destination(RouteAddress::Inet(
                    a.parse().unwrap(),
                )));
        }
        if let Some(g) = json.get("via") {
            r.attributes
                .push(RouteAttribute::Gateway(RouteAddress::Inet(
                    g.as_str().unwrap().parse().unwrap(),
                )));
        }
        if let Some(m) = json.get("mtu") {
            r.attributes
                .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(
                    m.as_u64().unwrap() as u32,
                )]));
        }
        r.attributes
            .push(RouteAttribute::Oif(json["oif"].as_u64().unwrap() as u32));
        r.attributes.push(RouteAttribute::Table(
            json.get("table")
                .map_or(MAIN_TABLE, |t| t.as_u64().unwrap() as u32),
        ));
        r
    }

    #[test]
    fn routes_keep_mtu_skip_kernel_and_other_links_and_put_gateways_last() {
        let routes = vec![
            route(serde_json::json!({"oif": 2, "via": "10.0.0.1", "mtu": 1400})),
            route(serde_json::json!({"oif": 2, "dst": "10.0.0.0/24", "kernel": true})),
            route(serde_json::json!({"oif": 2, "dst": "192.168.5.0/24"})),
            route(serde_json::json!({"oif": 3, "dst": "172.16.0.0/12"})),
            route(serde_json::json!({"oif": 2, "dst": "10.9.0.0/16", "table": 255})),
        ];
        let got = routes_of(&routes, 2);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].destination.unwrap().to_string(), "192.168.5.0/24");
        assert_eq!(got[0].gateway, None);
        assert_eq!(got[1].destination, None);
        assert_eq!(got[1].gateway, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(got[1].mtu, Some(1400));
    }

    #[test]
    fn candidates_need_up_addresses_and_a_mac_and_skip_our_taps() {
        let link = |name: &str, flags: LinkFlags| {
            let mut l = LinkMessage::default();
            l.header.index = 7;
            l.header.flags = flags;
            l.attributes = vec![
                LinkAttribute::IfName(name.into()),
                LinkAttribute::Address(vec![2, 0, 0, 0, 0, 9]),
                LinkAttribute::Mtu(1450),
            ];
            l
        };
        let mut addr = AddressMessage::default();
        addr.header.index = 7;
        addr.header.prefix_len = 16;
        addr.attributes = vec![AddressAttribute::Local("10.88.0.7".parse().unwrap())];
        let mut ll = AddressMessage::default();
        ll.header.index = 7;
        ll.header.prefix_len = 64;
        ll.attributes = vec![AddressAttribute::Address("fe80::1".parse().unwrap())];
        let addrs = vec![addr, ll.clone()];
        let c = Candidate::from_link(&link("eth0", LinkFlags::Up), &addrs).unwrap();
        assert_eq!(
            (c.name.as_str(), c.mtu, c.mac),
            ("eth0", 1450, [2, 0, 0, 0, 0, 9])
        );
        assert_eq!(c.addresses.len(), 1, "link-local left to the guest");
        assert!(Candidate::from_link(&link("eth0", LinkFlags::empty()), &addrs).is_none());
        assert!(
            Candidate::from_link(&link("lo", LinkFlags::Up | LinkFlags::Loopback), &addrs)
                .is_none()
        );
        assert!(Candidate::from_link(&link("krtap0", LinkFlags::Up), &addrs).is_none());
        assert!(Candidate::from_link(&link("eth0", LinkFlags::Up), &[ll]).is_none());
    }
}
