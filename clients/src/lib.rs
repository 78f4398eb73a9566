//! What the client scenarios (tests/clients.rs) drive their clients with:
//! commands bounded by a timeout, a terminal of the test's own for `-t` and
//! `-it`, and an OCI image layout built from the test rootfs.
pub mod command;
pub mod image;
pub mod terminal;
