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
    /// The config lists a network namespace without a path: the monitor makes a
    /// new one (as runc does for the container's init), the VM boots with a spare
    /// NIC, and a link that a client adds between create and start (`ctr run
    /// --cni` runs CNI on `/proc/<pid>/ns/net` then) is attached to it at start.
    Fresh,
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
        (NetworkMode::Auto, Some(None)) => (Plan::Fresh, None),
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

/// One tap of the VM and the link redirected to it: recorded before anything
/// is changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// `None`: a spare tap no link is redirected to (yet).
    #[serde(default)]
    pub link: Option<String>,
    #[serde(default)]
    pub link_index: Option<u32>,
    pub tap: String,
    /// The guest NIC's MAC of a spare tap (the link's MAC is set at start).
    #[serde(default)]
    pub spare_mac: Option<[u8; 6]>,
}

/// One NIC of the VM: the tap (open, for QEMU's `fd=`; by name for libkrun) and
/// what the guest device carries.
#[derive(Debug, Clone)]
pub struct Nic {
    pub tap: Arc<OwnedFd>,
    pub tap_name: String,
    pub mac: [u8; 6],
    /// The link's MTU (`None` for a spare NIC: the link comes later).
    pub mtu: Option<u32>,
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
    let (netns, required) = match plan {
        Plan::Attach { netns, required } => (netns, required),
        // Optional: without a tap device the container still runs, with loopback only.
        Plan::Fresh => {
            return Ok(spare_nic(record, persistent_taps).unwrap_or_else(|e| {
                log::warn!(
                    "{e}: no spare NIC, a network added before start will not reach the guest"
                );
                Attached::default()
            }))
        }
        Plan::LoopbackOnly => return Ok(Attached::default()),
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
        nothing_attached(netns, *required)?;
    }
    Ok(attached)
}

/// No link of `netns` was attached: an error when the plan requires one, else a warning.
fn nothing_attached(netns: &Path, required: bool) -> Result<()> {
    let why = format!(
        "network namespace {} has no up interface with addresses that is not already attached",
        netns.display()
    );
    if required {
        return Err(Error::Network(why));
    }
    log::warn!("{why}: the guest gets loopback only");
    Ok(())
}

/// A pooled VM's spare tap, just moved into the current network namespace
/// (the container's): taken over, then for [`Plan::Attach`] the namespace's
/// link is redirected to it now (what the guest configures is returned); for
/// [`Plan::Fresh`] that happens at start, as on the cold path.
pub fn attach_pooled(plan: &Plan, record: &Path, spare: &Claim) -> Result<Vec<NetInterface>> {
    adopt_spare_tap(record, spare)?;
    let Plan::Attach { netns, required } = plan else {
        return Ok(Vec::new());
    };
    let interfaces = attach_late(record, std::process::id() as i32)?;
    if interfaces.is_empty() {
        nothing_attached(netns, *required)?;
    }
    Ok(interfaces)
}

async fn attach_links(
    record: &Path,
    persistent_taps: bool,
    claims: &mut Vec<Claim>,
) -> Result<Attached> {
    let handle = connect()?;
    let (links, addresses, routes) = dump(&handle).await?;
    let mut out = Attached::default();
    for link in &links {
        let Some(candidate) = Candidate::from_link(link, &addresses) else {
            continue;
        };
        let tap_name = format!("{TAP_PREFIX}{}", out.nics.len());
        claims.push(Claim {
            link: Some(candidate.name.clone()),
            link_index: Some(candidate.index),
            tap: tap_name.clone(),
            spare_mac: None,
        });
        write_record(record, claims)?;
        if !claim_link(&handle, &candidate).await? {
            claims.pop();
            write_record(record, claims)?;
            continue;
        }
        let tap = open_tap(&tap_name, persistent_taps)?;
        redirect_both_ways(&handle, &candidate, &tap_name).await?;
        out.interfaces.push(candidate.interface(&routes, None));
        out.nics.push(Nic {
            tap: Arc::new(tap),
            tap_name,
            mac: candidate.mac,
            mtu: Some(candidate.mtu),
        });
    }
    Ok(out)
}

/// The link's own ingress qdisc is the claim: a second VM's add fails (false).
async fn claim_link(handle: &rtnetlink::Handle, link: &Candidate) -> Result<bool> {
    match add_ingress(handle, link.index).await {
        Ok(()) => Ok(true),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {
            log::warn!(
                "{}: it already has an ingress qdisc (another VM's?); not attached",
                link.name
            );
            Ok(false)
        }
        Err(e) => Err(nl(format!("ingress qdisc on {}", link.name))(e)),
    }
}

/// Tap up with the link's MTU, its ingress qdisc, and the two redirects.
async fn redirect_both_ways(handle: &rtnetlink::Handle, link: &Candidate, tap: &str) -> Result<()> {
    let tap_index = link_index(handle, tap).await?;
    handle
        .link()
        .set(
            rtnetlink::LinkUnspec::new_with_index(tap_index)
                .mtu(link.mtu)
                .up()
                .build(),
        )
        .execute()
        .await
        .map_err(nl(format!("bringing {tap} up")))?;
    add_ingress(handle, tap_index)
        .await
        .map_err(nl(format!("ingress qdisc on {tap}")))?;
    redirect(handle, link.index, tap_index)
        .await
        .map_err(nl(format!("redirect {} -> {tap}", link.name)))?;
    redirect(handle, tap_index, link.index)
        .await
        .map_err(nl(format!("redirect {tap} -> {}", link.name)))?;
    log::info!(
        "network: {} ({}, mtu {}) -> {tap}",
        link.name,
        format_mac(&link.mac),
        link.mtu
    );
    Ok(())
}

/// The spare NIC of a [`Plan::Fresh`] VM: a tap, up, no redirect yet, and a
/// locally administered MAC of its own until start gives it the link's.
pub fn spare_nic(record: &Path, persistent_taps: bool) -> Result<Attached> {
    let tap_name = format!("{TAP_PREFIX}0");
    let mut mac = [0u8; 6];
    std::io::Read::read_exact(
        &mut File::open("/dev/urandom").ctx(|| "opening /dev/urandom".into())?,
        &mut mac,
    )
    .ctx(|| "reading /dev/urandom".into())?;
    mac[0] = 0x02; // locally administered, unicast
    write_record(
        record,
        &[Claim {
            link: None,
            link_index: None,
            tap: tap_name.clone(),
            spare_mac: Some(mac),
        }],
    )?;
    let made = open_tap(&tap_name, persistent_taps).and_then(|tap| {
        block_on(async {
            let handle = connect()?;
            let index = link_index(&handle, &tap_name).await?;
            handle
                .link()
                .set(rtnetlink::LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
                .map_err(nl(format!("bringing {tap_name} up")))
        })?;
        Ok(tap)
    });
    match made {
        Ok(tap) => Ok(Attached {
            nics: vec![Nic {
                tap: Arc::new(tap),
                tap_name,
                mac,
                mtu: None,
            }],
            interfaces: Vec::new(),
        }),
        Err(e) => {
            let _ = release(record);
            Err(e)
        }
    }
}

/// How many links of the current network namespace [`attach`] would take.
pub fn candidate_count() -> Result<usize> {
    block_on(async {
        let handle = connect()?;
        let (links, addresses, _) = dump(&handle).await?;
        Ok(links
            .iter()
            .filter_map(|l| Candidate::from_link(l, &addresses))
            .count())
    })
}

/// The spare tap `record` lists (a pooled VM's NIC, which goes to its
/// container's namespace with [`move_spare_tap`]): its claim, which the
/// container's record takes over.
pub fn spare_tap(record: &Path) -> Result<Claim> {
    read_record(record)?
        .unwrap_or_default()
        .into_iter()
        .find(|c| c.link.is_none() && c.spare_mac.is_some())
        .ok_or_else(|| Error::Network("this VM has no spare NIC".into()))
}

/// Moves `spare` (see [`spare_tap`]) from the current network namespace into
/// `netns`; `record` forgets it. The kernel makes a move wait for an RCU grace
/// period (~15 ms here): the claimant sets its guest up meanwhile.
pub fn move_spare_tap(record: &Path, spare: &Claim, netns: &File) -> Result<()> {
    block_on(async {
        let handle = connect()?;
        let index = link_index(&handle, &spare.tap).await?;
        handle
            .link()
            .set(
                rtnetlink::LinkUnspec::new_with_index(index)
                    .setns_by_fd(netns.as_raw_fd())
                    .build(),
            )
            .execute()
            .await
            .map_err(nl(format!(
                "moving {} to the container's network namespace",
                spare.tap
            )))
    })?;
    let rest: Vec<Claim> = read_record(record)?
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c != spare)
        .collect();
    write_record(record, &rest)
}

/// Takes over a spare tap moved into the current network namespace (see
/// [`move_spare_tap`]): recorded, then brought up, for [`attach_late`] to
/// redirect a link to.
fn adopt_spare_tap(record: &Path, spare: &Claim) -> Result<()> {
    write_record(record, std::slice::from_ref(spare))?;
    block_on(async {
        let handle = connect()?;
        let index = link_index(&handle, &spare.tap).await?;
        handle
            .link()
            .set(rtnetlink::LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl(format!("bringing {} up", spare.tap)))
    })
}

/// At start, for a [`Plan::Fresh`] VM: redirects the first link a client added
/// to the container's namespace (the monitor's, `/proc/<monitor_pid>/ns/net`)
/// to the spare tap. Returns what guest-init configures (empty: nothing was
/// added, the guest keeps loopback only).
pub fn attach_late(record: &Path, monitor_pid: i32) -> Result<Vec<NetInterface>> {
    let Some(mut claims) = read_record(record)? else {
        return Ok(Vec::new());
    };
    let Some(spare) = claims
        .iter()
        .position(|c| c.link.is_none() && c.spare_mac.is_some())
    else {
        return Ok(Vec::new());
    };
    // A first look without netlink (every `start` comes here, and most containers
    // get no link after create): only loopback and our taps, nothing to attach.
    if !link_names(monitor_pid)?
        .iter()
        .any(|n| may_be_a_candidate(n))
    {
        return Ok(Vec::new());
    }
    let netns = File::open(format!("/proc/{monitor_pid}/ns/net"))
        .ctx(|| "opening the container's network namespace".into())?;
    let record = record.to_owned();
    std::thread::spawn(move || -> Result<Vec<NetInterface>> {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| Error::Network(format!("joining the network namespace: {e}")))?;
        block_on(async {
            let handle = connect()?;
            let (links, addresses, routes) = dump(&handle).await?;
            let mut candidates = links
                .iter()
                .filter_map(|l| Candidate::from_link(l, &addresses));
            let Some(link) = candidates.next() else {
                return Ok(Vec::new());
            };
            for other in candidates {
                log::warn!(
                    "{}: the VM has one spare NIC, taken by {}; not attached",
                    other.name,
                    link.name
                );
            }
            claims[spare].link = Some(link.name.clone());
            claims[spare].link_index = Some(link.index);
            write_record(&record, &claims)?;
            if !claim_link(&handle, &link).await? {
                claims[spare].link = None;
                claims[spare].link_index = None;
                write_record(&record, &claims)?;
                return Ok(Vec::new());
            }
            let tap = claims[spare].tap.clone();
            redirect_both_ways(&handle, &link, &tap).await?;
            Ok(vec![link.interface(&routes, claims[spare].spare_mac)])
        })
    })
    .join()
    .map_err(|_| Error::Network("the network attach thread panicked".into()))?
}

/// The links of `pid`'s network namespace, read from `/proc/PID/net/dev`.
fn link_names(pid: i32) -> Result<Vec<String>> {
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/dev"))
        .ctx(|| "listing the container's network links".into())?;
    Ok(parse_net_dev(&table))
}

/// The interface names of a `/proc/net/dev` table (two header lines, then
/// `NAME: counters` per link).
fn parse_net_dev(table: &str) -> Vec<String> {
    table
        .lines()
        .skip(2)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, _)| name.trim().to_string())
        .collect()
}

/// Whether a link so named could be attached ([`Candidate::from_link`] decides).
fn may_be_a_candidate(name: &str) -> bool {
    name != "lo" && !is_our_tap(name)
}

/// A tap the VM's NICs use (a link of ours, never the container's).
fn is_our_tap(name: &str) -> bool {
    name.starts_with(TAP_PREFIX)
}

type Dump = (Vec<LinkMessage>, Vec<AddressMessage>, Vec<RouteMessage>);

async fn dump(handle: &rtnetlink::Handle) -> Result<Dump> {
    let links = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing links"))?;
    let addresses = handle
        .address()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(nl("listing addresses"))?;
    Ok((links, addresses, list_routes(handle).await?))
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
    /// What guest-init configures for this link (on the NIC that has
    /// `device_mac` now, where that is not the link's own).
    fn interface(&self, routes: &[RouteMessage], device_mac: Option<[u8; 6]>) -> NetInterface {
        NetInterface {
            name: self.name.clone(),
            mac: format_mac(&self.mac),
            device_mac: device_mac.map(|m| format_mac(&m)),
            mtu: self.mtu,
            addresses: self.addresses.clone(),
            routes: routes_of(routes, self.index),
        }
    }

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
        let name = name.filter(|n| !is_our_tap(n))?;
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
        if let (Some(name), Some(index)) = (&c.link, c.link_index) {
            // Only if the index still names the link we claimed.
            let link = handle
                .link()
                .get()
                .match_index(index)
                .execute()
                .try_next()
                .await
                .ok()
                .flatten();
            let same = link.is_some_and(|l| {
                l.attributes
                    .iter()
                    .any(|a| matches!(a, LinkAttribute::IfName(n) if n == name))
            });
            if same {
                if let Err(e) = del_ingress(&handle, index).await {
                    if !is_gone(&e) {
                        first_error
                            .get_or_insert(nl(format!("removing {name}'s ingress qdisc"))(e));
                    }
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

    #[test]
    fn links_are_read_from_proc_net_dev() {
        let table = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0
krtap0a1b:    0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0
  eth0: 1296      16    0    0    0     0          0         0      936      12    0    0    0     0       0          0
";
        let names = parse_net_dev(table);
        assert_eq!(names, ["lo", "krtap0a1b", "eth0"]);
        let candidates: Vec<_> = names.iter().filter(|n| may_be_a_candidate(n)).collect();
        assert_eq!(candidates, ["eth0"]);
        // This process's own namespace has at least loopback.
        assert!(link_names(std::process::id() as i32)
            .unwrap()
            .contains(&"lo".to_string()));
    }

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
        assert_eq!(plan(&fresh).unwrap(), (Plan::Fresh, None));
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
