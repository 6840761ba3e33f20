//! The mirror agent: runs next to the vendor's production and keeps the escrow current.
//! Client side only; it talks to the cluster through [`crate::client::EscrowClient`].

pub mod artifacts;
pub mod dir;
pub mod records;
