//! The compact, versioned binary encoding for log entries, stored values and Raft RPC payloads.
//!
//! Layout: one format-version byte, then bincode with variable-length integers. Decoding checks
//! the version first and bounds the allocation, so a corrupt or hostile payload is an error,
//! never a crash or an out-of-memory.

use bincode::Options;
use serde::{de::DeserializeOwned, Serialize};

/// Bumped whenever an encoded type changes shape; decoders refuse versions they do not know.
pub const FORMAT_VERSION: u8 = 7;
/// Largest payload this codec encodes or decodes, in bytes: bounds memory on hostile input.
/// It is at least the largest peer message (checked at compile time in node.rs), so nothing the
/// node builds can exceed it.
pub const DECODE_LEN_MAX: u64 = 128 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("empty payload")]
    Empty,
    #[error("unknown format version {found} (this build reads version {FORMAT_VERSION})")]
    Version { found: u8 },
    #[error("malformed payload: {0}")]
    Malformed(#[from] bincode::Error),
}

fn options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_varint_encoding()
        .with_limit(DECODE_LEN_MAX)
}

pub fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(FORMAT_VERSION);
    // Serialising our own in-memory types into a Vec cannot fail except by exceeding the
    // limit, which only a programming error (an unbounded batch) can cause.
    options()
        .serialize_into(&mut out, value)
        .expect("encoding an in-memory value within the size limit");
    out
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(CodecError::Version { found: version });
    }
    Ok(options().deserialize(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: round trips work; wrong versions and garbage are errors, not panics.
    #[test]
    fn versioned_round_trip_and_rejects_garbage() {
        let v = (42u64, "hello".to_string(), vec![1u8, 2, 3]);
        let bytes = encode(&v);
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode::<(u64, String, Vec<u8>)>(&bytes).unwrap(), v);
        assert!(matches!(decode::<u64>(&[]), Err(CodecError::Empty)));
        assert!(matches!(
            decode::<u64>(&[99, 1]),
            Err(CodecError::Version { found: 99 })
        ));
        // A length prefix claiming far more than the limit must not allocate it.
        let mut hostile = vec![FORMAT_VERSION, 0xFF];
        hostile.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode::<Vec<u8>>(&hostile).is_err());
    }
}
