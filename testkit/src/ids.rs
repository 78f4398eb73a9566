//! Container ids unique on this host: a per-process prefix and a counter, so
//! that concurrent test processes never collide and a leak check can tell this
//! process's containers (and their cgroups) by the prefix.
use std::sync::atomic::{AtomicUsize, Ordering};

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// What every id [`unique`] makes from `stem` in this process starts with.
pub fn prefix(stem: &str) -> String {
    format!("{stem}{}-", std::process::id())
}

/// A fresh id: `<stem><pid>-<n>`.
pub fn unique(stem: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed) + 1;
    format!("{}{n}", prefix(stem))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_and_share_the_prefix() {
        let (a, b) = (unique("t"), unique("t"));
        assert_ne!(a, b);
        assert!(a.starts_with(&prefix("t")) && b.starts_with(&prefix("t")));
    }
}
