//! The container's network as the host hands it to guest-init in
//! [`crate::Message::Setup`]: one entry per NIC the VM was given (a tap on the
//! host, redirected to and from one link of the container's network namespace).
//! Guest-init finds each NIC by its MAC, gives it the link's name and MTU, brings
//! it up and copies the addresses and routes (docs/protocol.md, docs/network.md).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Longest interface name Linux accepts (`IFNAMSIZ` - 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// An address with its prefix length (`10.88.0.5/16`, `fd00::5/64`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpPrefix {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl IpPrefix {
    /// Whether the prefix length fits the address family.
    pub fn is_valid(&self) -> bool {
        let max = if self.addr.is_ipv4() { 32 } else { 128 };
        self.prefix_len <= max
    }
}

impl std::fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// A route of the main table through one interface, as `ip route` shows it
/// (the kernel's own `proto kernel` routes are left out: the guest's kernel makes
/// them when the addresses are added).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRoute {
    /// `None`: the default route of the gateway's family.
    pub destination: Option<IpPrefix>,
    /// `None`: a link route (destination directly on the interface).
    pub gateway: Option<IpAddr>,
    /// The route's `mtu` metric, if it has one (kept: CNI plugins set it).
    #[serde(default)]
    pub mtu: Option<u32>,
    /// The route's priority (`metric` in `ip route`).
    #[serde(default)]
    pub priority: Option<u32>,
    /// Gateway reachable on the link without a covering prefix (`onlink`).
    #[serde(default)]
    pub onlink: bool,
}

impl NetRoute {
    /// Whether this is an IPv6 route.
    pub fn is_ipv6(&self) -> bool {
        match (&self.destination, &self.gateway) {
            (Some(d), _) => d.addr.is_ipv6(),
            (None, Some(g)) => g.is_ipv6(),
            (None, None) => false,
        }
    }
}

/// One NIC of the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInterface {
    /// The link's name in the container's network namespace (`eth0`).
    pub name: String,
    /// The link's MAC, which the guest NIC carries: `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// The MAC the guest NIC has now, where it differs from `mac`: a spare NIC the
    /// VM booted with before the link existed (`ctr run --cni` adds it between
    /// create and start). Guest-init finds the NIC by it and sets `mac`.
    #[serde(default)]
    pub device_mac: Option<String>,
    pub mtu: u32,
    pub addresses: Vec<IpPrefix>,
    pub routes: Vec<NetRoute>,
}

/// `aa:bb:cc:dd:ee:ff` for six bytes.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff` (case-insensitive).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Whether `name` is a usable interface name (what `dev_valid_name` accepts).
pub fn is_valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_roundtrip_and_bad_ones_fail() {
        let mac = [0x02, 0x42, 0xac, 0x11, 0x00, 0x0f];
        assert_eq!(format_mac(&mac), "02:42:ac:11:00:0f");
        assert_eq!(parse_mac("02:42:AC:11:00:0f"), Some(mac));
        for bad in [
            "",
            "02:42:ac:11:00",
            "02:42:ac:11:00:0f:00",
            "2:42:ac:11:00:0f",
            "zz:42:ac:11:00:0f",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn interface_names() {
        assert!(is_valid_ifname("eth0"));
        assert!(is_valid_ifname("a23456789012345"));
        for bad in ["", "a234567890123456", "a/b", "a b", "..", "a:1"] {
            assert!(!is_valid_ifname(bad), "{bad}");
        }
    }

    #[test]
    fn prefixes_and_route_family() {
        let p = IpPrefix {
            addr: "10.0.0.2".parse().unwrap(),
            prefix_len: 24,
        };
        assert!(p.is_valid());
        assert_eq!(p.to_string(), "10.0.0.2/24");
        assert!(!IpPrefix {
            prefix_len: 33,
            ..p
        }
        .is_valid());
        let r = NetRoute {
            destination: None,
            gateway: Some("fd00::1".parse().unwrap()),
            mtu: None,
            priority: None,
            onlink: false,
        };
        assert!(r.is_ipv6());
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<NetRoute>(&json).unwrap(), r);
    }
}
