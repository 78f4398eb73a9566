//! Which `mounts` entries of config.json are bind mounts of host paths, and how
//! host and guest agree on them without another message: the host serves every
//! shared bind source through one extra virtio-fs share (tag [`MOUNTS_TAG`]), as
//! entry `"0"`, `"1"`, ... in config order; the guest walks the same list.

use oci_spec::runtime::Mount;

/// virtio-fs tag of the share that holds the bind sources.
pub const MOUNTS_TAG: &str = "krun-mounts";

/// A bind mount: type `bind`, or a `bind`/`rbind` option (runc's rule).
pub fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|o| o == "bind" || o == "rbind")
}

/// Whether a bind mount is shared from the host. `/dev/shm` is not: the guest's
/// own tmpfs serves it (a host tmpfs behind virtio-fs would be slow, and its
/// memory is not shareable with host processes across the VM boundary anyway).
pub fn is_shared_bind(m: &Mount) -> bool {
    is_bind(m) && clean(&m.destination().to_string_lossy()) != "/dev/shm"
}

/// The shared bind mounts: (position in `mounts`, share entry name).
pub fn shared_binds(mounts: &[Mount]) -> Vec<(usize, String)> {
    mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| is_shared_bind(m))
        .enumerate()
        .map(|(entry, (pos, _))| (pos, entry.to_string()))
        .collect()
}

/// `/dev//shm/` -> `/dev/shm` (no `..` resolution: that is the guest's business).
fn clean(p: &str) -> String {
    let parts: Vec<&str> = p
        .split('/')
        .filter(|s| !s.is_empty() && *s != ".")
        .collect();
    format!("/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(json: &str) -> Mount {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn binds_by_type_or_option() {
        assert!(is_bind(&m(
            r#"{"destination":"/a","type":"bind","source":"/x"}"#
        )));
        assert!(is_bind(&m(
            r#"{"destination":"/a","type":"none","source":"/x","options":["rbind","ro"]}"#
        )));
        assert!(is_bind(&m(
            r#"{"destination":"/a","source":"/x","options":["bind"]}"#
        )));
        assert!(!is_bind(&m(
            r#"{"destination":"/a","type":"tmpfs","source":"tmpfs","options":["nosuid"]}"#
        )));
    }

    #[test]
    fn entries_number_shared_binds_in_order() {
        let mounts = vec![
            m(r#"{"destination":"/proc","type":"proc","source":"proc"}"#),
            m(r#"{"destination":"/etc/hosts","type":"bind","source":"/h"}"#),
            m(r#"{"destination":"/dev//shm/","type":"bind","source":"/shm"}"#),
            m(r#"{"destination":"/data","source":"/d","options":["rbind"]}"#),
        ];
        assert_eq!(
            shared_binds(&mounts),
            vec![(1, "0".to_string()), (3, "1".to_string())]
        );
    }
}
