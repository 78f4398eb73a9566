//! The guest's network, at Setup: `lo` up always (runc brings it up in a new
//! network namespace), then each NIC the host gave the VM, found by its MAC:
//! the name it has in the container's network namespace (`eth0`), its MTU, up,
//! its addresses (IPv6 without duplicate address detection: the address is the
//! netns's own, and a tentative address would not be usable for a second or
//! more) and its routes (link routes first, then gateways).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use krun_oci_protocol::net::{is_valid_ifname, parse_mac, NetInterface, NetRoute};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressHeaderFlags};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::route::{RouteAttribute, RouteFlags, RouteMetric, RouteScope};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// Brings `lo` up and configures `nics`.
pub fn apply(nics: &[NetInterface]) -> Result<(), String> {
    if nics.is_empty() {
        // Loopback only (most containers): one ioctl, not a netlink runtime,
        // which costs tens of milliseconds of emulated CPU under TCG.
        return loopback_up().map_err(|e| format!("network: lo up: {e}"));
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| format!("network: starting the netlink runtime: {e}"))?
        .block_on(configure(nics))
        .map_err(|e| format!("network: {e}"))
}

/// `ip link set lo up` by `SIOCSIFFLAGS`.
fn loopback_up() -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: socket(2) returns a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; zeroed is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo") {
        *d = *s as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

async fn configure(nics: &[NetInterface]) -> Result<(), String> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| format!("opening a netlink socket: {e}"))?;
    tokio::spawn(connection);
    let links: Vec<LinkMessage> = handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| format!("listing links: {e}"))?;
    let lo = links
        .iter()
        .find(|l| name_of(l) == Some("lo"))
        .ok_or("no loopback interface")?;
    set_link(
        &handle,
        LinkUnspec::new_with_index(lo.header.index).up().build(),
        "lo up",
    )
    .await?;

    // Each NIC's index, by MAC; first moved aside under a temporary name, so a
    // wanted name held by another NIC (the kernel named them eth0, eth1, ...) is free.
    let mut found = Vec::new();
    for (i, nic) in nics.iter().enumerate() {
        if !is_valid_ifname(&nic.name) {
            return Err(format!("invalid interface name {:?}", nic.name));
        }
        let mac = parse_mac(&nic.mac).ok_or_else(|| format!("invalid MAC {:?}", nic.mac))?;
        let device = nic.device_mac.as_deref().unwrap_or(&nic.mac);
        let device = parse_mac(device).ok_or_else(|| format!("invalid MAC {device:?}"))?;
        let link = links
            .iter()
            .find(|l| mac_of(l) == Some(device))
            .ok_or_else(|| format!("no NIC with MAC {} for {}", nic.mac, nic.name))?;
        let index = link.header.index;
        if name_of(link) != Some(nic.name.as_str()) || device != mac {
            // Down first: neither the name nor (for virtio-net) the MAC changes while up.
            set_link(
                &handle,
                LinkUnspec::new_with_index(index).down().build(),
                "down",
            )
            .await?;
            let mut change = LinkUnspec::new_with_index(index).name(format!("krnic{i}"));
            if device != mac {
                change = change.address(mac.to_vec());
            }
            set_link(&handle, change.build(), "rename").await?;
        }
        found.push(index);
    }
    for (nic, &index) in nics.iter().zip(&found) {
        set_link(
            &handle,
            LinkUnspec::new_with_index(index)
                .name(nic.name.clone())
                .mtu(nic.mtu)
                .up()
                .build(),
            &format!("{} up (mtu {})", nic.name, nic.mtu),
        )
        .await?;
        for a in &nic.addresses {
            if !a.is_valid() {
                return Err(format!("{}: invalid address {a}", nic.name));
            }
            let mut req = handle.address().add(index, a.addr, a.prefix_len);
            if a.addr.is_ipv6() {
                let msg = req.message_mut();
                msg.header.flags |= AddressHeaderFlags::Nodad;
                msg.attributes
                    .push(AddressAttribute::Flags(AddressFlags::Nodad));
            }
            ok_if_exists(req.execute().await)
                .map_err(|e| format!("{}: adding {a}: {e}", nic.name))?;
        }
        // Link routes first: a gateway must be reachable when its route is added.
        let mut routes: Vec<&NetRoute> = nic.routes.iter().collect();
        routes.sort_by_key(|r| r.gateway.is_some());
        for r in routes {
            let msg = route_message(r, index)?;
            ok_if_exists(handle.route().add(msg).execute().await)
                .map_err(|e| format!("{}: adding route {}: {e}", nic.name, describe(r)))?;
        }
        log::info!(
            "network: {} {} mtu {} with {} address(es), {} route(s)",
            nic.name,
            nic.mac,
            nic.mtu,
            nic.addresses.len(),
            nic.routes.len()
        );
    }
    Ok(())
}

async fn set_link(handle: &Handle, msg: LinkMessage, what: &str) -> Result<(), String> {
    handle
        .link()
        .set(msg)
        .execute()
        .await
        .map_err(|e| format!("{what}: {e}"))
}

fn route_message(
    r: &NetRoute,
    index: u32,
) -> Result<netlink_packet_route::route::RouteMessage, String> {
    let bad = || format!("route {} mixes address families", describe(r));
    let mut msg = if r.is_ipv6() {
        let mut b = RouteMessageBuilder::<Ipv6Addr>::new().output_interface(index);
        if let Some(d) = r.destination {
            let IpAddr::V6(a) = d.addr else {
                return Err(bad());
            };
            b = b.destination_prefix(a, d.prefix_len);
        }
        if let Some(g) = r.gateway {
            let IpAddr::V6(g) = g else { return Err(bad()) };
            b = b.gateway(g);
        }
        b.build()
    } else {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new().output_interface(index);
        if let Some(d) = r.destination {
            let IpAddr::V4(a) = d.addr else {
                return Err(bad());
            };
            b = b.destination_prefix(a, d.prefix_len);
        }
        match r.gateway {
            Some(IpAddr::V4(g)) => b = b.gateway(g),
            Some(IpAddr::V6(_)) => return Err(bad()),
            // `ip route add 10.1.0.0/16 dev eth0` is scope link.
            None => b = b.scope(RouteScope::Link),
        }
        b.build()
    };
    if let Some(p) = r.priority {
        msg.attributes.push(RouteAttribute::Priority(p));
    }
    if let Some(m) = r.mtu {
        msg.attributes
            .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(m)]));
    }
    if r.onlink {
        msg.header.flags |= RouteFlags::Onlink;
    }
    Ok(msg)
}

fn describe(r: &NetRoute) -> String {
    let dest = r
        .destination
        .map_or("default".to_string(), |d| d.to_string());
    match r.gateway {
        Some(g) => format!("{dest} via {g}"),
        None => dest,
    }
}

/// The kernel may already have made it (an IPv6 link route for an address).
fn ok_if_exists(r: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match r {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        other => other,
    }
}

fn name_of(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

fn mac_of(l: &LinkMessage) -> Option<[u8; 6]> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => <[u8; 6]>::try_from(m.as_slice()).ok(),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use krun_oci_protocol::net::IpPrefix;

    fn prefix(s: &str) -> IpPrefix {
        let (a, p) = s.split_once('/').unwrap();
        IpPrefix {
            addr: a.parse().unwrap(),
            prefix_len: p.parse().unwrap(),
        }
    }

    #[test]
    fn route_messages() {
        let link = NetRoute {
            destination: Some(prefix("10.1.0.0/16")),
            gateway: None,
            mtu: Some(1400),
            priority: None,
            onlink: false,
        };
        let m = route_message(&link, 3).unwrap();
        assert_eq!(m.header.scope, RouteScope::Link);
        assert_eq!(m.header.destination_prefix_length, 16);
        assert!(m.attributes.contains(&RouteAttribute::Oif(3)));
        assert!(m
            .attributes
            .contains(&RouteAttribute::Metrics(vec![RouteMetric::Mtu(1400)])));
        let default6 = NetRoute {
            destination: None,
            gateway: Some("fd00::1".parse().unwrap()),
            mtu: None,
            priority: Some(100),
            onlink: true,
        };
        let m = route_message(&default6, 3).unwrap();
        assert_eq!(m.header.destination_prefix_length, 0);
        assert_eq!(m.header.scope, RouteScope::Universe);
        assert!(m.header.flags.contains(RouteFlags::Onlink));
        assert!(m.attributes.contains(&RouteAttribute::Priority(100)));
        let mixed = NetRoute {
            destination: Some(prefix("10.0.0.0/8")),
            gateway: Some("fd00::1".parse().unwrap()),
            ..link
        };
        assert!(route_message(&mixed, 3).is_err());
        assert_eq!(describe(&default6), "default via fd00::1");
    }
}
