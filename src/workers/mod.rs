//! Background workers: each does one bounded unit of work per step and stops with the node's
//! shutdown channel.

pub mod blobs;
pub mod chunks;
pub mod disk;
pub mod freshness;
pub mod retention;
pub mod scrub;
pub mod snapshots;
