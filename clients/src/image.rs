//! An OCI image layout, built offline from a rootfs: one gzip layer (the rootfs,
//! owned by root, plus `etc/image-marker`), its config and manifest, and an
//! index naming it `latest`; as one tar that `ctr images import` takes.
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use flate2::write::GzEncoder;
use flate2::Compression;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The file the layer adds, and what it holds: a run that prints it ran the image.
pub const MARKER_PATH: &str = "etc/image-marker";
pub const MARKER: &str = "from-image-layer\n";

const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// A blob of the layout: its digest and size, as descriptors name them.
struct Blob {
    hex: String,
    data: Vec<u8>,
}

impl Blob {
    fn new(data: Vec<u8>) -> Blob {
        Blob {
            hex: sha256_hex(&data),
            data,
        }
    }

    fn descriptor(&self, media_type: &str) -> Value {
        json!({"mediaType": media_type, "digest": format!("sha256:{}", self.hex), "size": self.data.len()})
    }
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes the layout of `rootfs` as a tar at `out`.
pub fn write_layout(rootfs: &Path, out: &Path) -> Result<()> {
    let layer_tar = layer(rootfs)?;
    let diff_id = format!("sha256:{}", sha256_hex(&layer_tar));
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(&layer_tar)?;
    let layer = Blob::new(gz.finish()?);
    let platform = json!({"architecture": "amd64", "os": "linux"});
    let config = Blob::new(serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }))?);
    let manifest = Blob::new(serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": config.descriptor("application/vnd.oci.image.config.v1+json"),
        "layers": [layer.descriptor("application/vnd.oci.image.layer.v1.tar+gzip")],
    }))?);
    let mut manifest_entry = manifest.descriptor(MANIFEST_TYPE);
    manifest_entry["platform"] = platform;
    manifest_entry["annotations"] = json!({"org.opencontainers.image.ref.name": "latest"});
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest_entry],
    });
    let mut archive = tar::Builder::new(File::create(out)?);
    let mut add = |name: &str, data: &[u8]| -> Result<()> {
        let mut header = file_header(data.len());
        archive
            .append_data(&mut header, name, data)
            .with_context(|| format!("adding {name}"))
    };
    add(
        "oci-layout",
        &serde_json::to_vec(&json!({"imageLayoutVersion": "1.0.0"}))?,
    )?;
    add("index.json", &serde_json::to_vec(&index)?)?;
    for blob in [&layer, &config, &manifest] {
        add(&format!("blobs/sha256/{}", blob.hex), &blob.data)?;
    }
    archive.into_inner()?.sync_all()?;
    Ok(())
}

/// A regular file of `size` bytes, mode 0644, root's, from the epoch.
fn file_header(size: usize) -> tar::Header {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size as u64);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header
}

/// The uncompressed layer: every file of `rootfs` as root's (modes kept), then
/// the marker.
fn layer(rootfs: &Path) -> Result<Vec<u8>> {
    let mut layer = tar::Builder::new(Vec::new());
    layer.follow_symlinks(false);
    let mut pending = vec![rootfs.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let mut entries: Vec<_> = fs::read_dir(&dir)?.collect::<std::io::Result<_>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let name = path.strip_prefix(rootfs)?;
            let meta = fs::symlink_metadata(&path)?;
            let mut header = tar::Header::new_ustar();
            header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
            header.set_uid(0);
            header.set_gid(0);
            header.set_username("root")?;
            header.set_groupname("root")?;
            if meta.file_type().is_symlink() {
                layer.append_link(&mut header, name, fs::read_link(&path)?)?;
            } else if meta.is_dir() {
                layer.append_data(&mut header, name, std::io::empty())?;
                pending.push(path);
            } else {
                layer.append_data(&mut header, name, File::open(&path)?)?;
            }
        }
    }
    let mut header = file_header(MARKER.len());
    header.set_username("root")?;
    header.set_groupname("root")?;
    layer.append_data(&mut header, MARKER_PATH, MARKER.as_bytes())?;
    Ok(layer.into_inner()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn the_layout_names_its_blobs_by_digest() {
        let dir = std::env::temp_dir().join(krun_oci_testkit::ids::unique("clients-image"));
        let rootfs = dir.join("rootfs");
        fs::create_dir_all(rootfs.join("bin")).unwrap();
        fs::write(rootfs.join("bin/tool"), "x").unwrap();
        std::os::unix::fs::symlink("tool", rootfs.join("bin/alias")).unwrap();
        let out = dir.join("image.tar");
        write_layout(&rootfs, &out).unwrap();
        let mut files = std::collections::BTreeMap::new();
        for entry in tar::Archive::new(File::open(&out).unwrap())
            .entries()
            .unwrap()
        {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().display().to_string();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            files.insert(name, data);
        }
        let index: Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let digest = index["manifests"][0]["digest"].as_str().unwrap();
        let manifest = &files[&format!("blobs/sha256/{}", &digest[7..])];
        assert_eq!(format!("sha256:{}", sha256_hex(manifest)), digest);
        let manifest: Value = serde_json::from_slice(manifest).unwrap();
        let layer_digest = manifest["layers"][0]["digest"].as_str().unwrap();
        let layer = &files[&format!("blobs/sha256/{}", &layer_digest[7..])];
        let mut names = Vec::new();
        let mut layer = tar::Archive::new(flate2::read::GzDecoder::new(&layer[..]));
        for entry in layer.entries().unwrap() {
            let entry = entry.unwrap();
            assert_eq!(entry.header().uid().unwrap(), 0);
            names.push(entry.path().unwrap().display().to_string());
        }
        assert_eq!(names, ["bin", "bin/alias", "bin/tool", MARKER_PATH]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
