//! Helpers for unit tests.

use oci_spec::runtime::Spec;

/// The default spec with its top-level `field` replaced by `value`.
pub fn spec_with(field: &str, value: serde_json::Value) -> Spec {
    let mut v = serde_json::to_value(Spec::default()).unwrap();
    v[field] = value;
    serde_json::from_value(v).unwrap()
}
