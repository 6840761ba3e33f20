//! Plain domain types and input validation. No IO, no gRPC, no RocksDB.
//!
//! Every value that arrives from outside (network, CLI, files) passes through one of the
//! constructors here before it reaches the ledger, so the ledger can rely on its invariants.

use serde::{Deserialize, Serialize};

/// Longest tenant id, in bytes. Tenant ids are slugs so they are safe in paths, metric labels
/// and URLs.
pub const TENANT_ID_LEN_MAX: usize = 63;
/// Longest collection name, in bytes.
pub const COLLECTION_LEN_MAX: usize = 63;
/// Longest record key, in bytes.
pub const KEY_LEN_MAX: usize = 1024;
/// Largest record value, in bytes. Bulk content belongs in artifacts (chunked, outside the log).
pub const VALUE_LEN_MAX: usize = 1024 * 1024;
/// The shared namespace for the vendor's own software.
pub const VENDOR_NAMESPACE: &str = "vendor";

/// Why an input was refused. Each message names the field, the value's problem and the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("{field} is empty")]
    Empty { field: &'static str },
    #[error("{field} is {len} bytes, over the limit of {max} bytes")]
    TooLarge {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field} {value:?} is invalid: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
}

impl InputError {
    /// Oversized inputs map to RESOURCE_EXHAUSTED, the rest to INVALID_ARGUMENT.
    pub fn is_too_large(&self) -> bool {
        matches!(self, InputError::TooLarge { .. })
    }
}

/// Validates a slug: lowercase ASCII letters, digits and '-', starting and ending with a letter
/// or digit. The caller's `extra` characters are also allowed inside.
fn validate_slug(
    field: &'static str,
    value: &str,
    max: usize,
    extra: &[u8],
) -> Result<(), InputError> {
    if value.is_empty() {
        return Err(InputError::Empty { field });
    }
    if value.len() > max {
        return Err(InputError::TooLarge {
            field,
            len: value.len(),
            max,
        });
    }
    let bytes = value.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !bytes
        .iter()
        .all(|&b| alnum(b) || b == b'-' || extra.contains(&b))
    {
        return Err(InputError::Invalid {
            field,
            value: value.chars().take(80).collect(),
            reason: "only lowercase letters, digits and '-' are allowed",
        });
    }
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(InputError::Invalid {
            field,
            value: value.to_string(),
            reason: "must start and end with a lowercase letter or digit",
        });
    }
    Ok(())
}

/// One beneficiary customer. All its data lives under this id and nowhere else.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TenantId(String);

impl TenantId {
    pub fn parse(value: &str) -> Result<Self, InputError> {
        validate_slug("tenant id", value, TENANT_ID_LEN_MAX, &[])?;
        Ok(Self(value.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A collection of records inside a tenant.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Collection(String);

impl Collection {
    pub fn parse(value: &str) -> Result<Self, InputError> {
        validate_slug("collection", value, COLLECTION_LEN_MAX, b"_.")?;
        Ok(Self(value.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A record key: UTF-8 text without control characters, at most [`KEY_LEN_MAX`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RecordKey(String);

impl RecordKey {
    pub fn parse(value: &str) -> Result<Self, InputError> {
        if value.is_empty() {
            return Err(InputError::Empty { field: "key" });
        }
        if value.len() > KEY_LEN_MAX {
            return Err(InputError::TooLarge {
                field: "key",
                len: value.len(),
                max: KEY_LEN_MAX,
            });
        }
        if value.chars().any(char::is_control) {
            return Err(InputError::Invalid {
                field: "key",
                value: value.chars().take(80).collect(),
                reason: "control characters are not allowed",
            });
        }
        Ok(Self(value.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks a record value against the size limit. Empty values are refused: a delete is the way
/// to say "nothing here".
pub fn validate_value(value: &[u8]) -> Result<(), InputError> {
    if value.is_empty() {
        return Err(InputError::Empty { field: "value" });
    }
    if value.len() > VALUE_LEN_MAX {
        return Err(InputError::TooLarge {
            field: "value",
            len: value.len(),
            max: VALUE_LEN_MAX,
        });
    }
    Ok(())
}

/// The full address of one record.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RecordPath {
    pub tenant: TenantId,
    pub collection: Collection,
    pub key: RecordKey,
}

impl RecordPath {
    pub fn parse(tenant: &str, collection: &str, key: &str) -> Result<Self, InputError> {
        Ok(Self {
            tenant: TenantId::parse(tenant)?,
            collection: Collection::parse(collection)?,
            key: RecordKey::parse(key)?,
        })
    }
}

/// A stored record version as the ledger sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordVersion {
    /// The commit index of the write that produced this version.
    pub revision: u64,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// Node ids are never reused; 0 means "none" in wire formats, so real ids start at 1.
pub fn validate_node_id(id: u64) -> Result<u64, InputError> {
    if id == 0 {
        return Err(InputError::Invalid {
            field: "node id",
            value: "0".into(),
            reason: "node ids start at 1",
        });
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the tenant id rules that keep tenants apart in keys, paths and labels hold.
    #[test]
    fn tenant_ids_are_bounded_slugs() {
        assert!(TenantId::parse("acme-corp").is_ok());
        assert!(TenantId::parse("a").is_ok());
        assert!(TenantId::parse(&"a".repeat(TENANT_ID_LEN_MAX)).is_ok());
        assert!(matches!(
            TenantId::parse(&"a".repeat(TENANT_ID_LEN_MAX + 1)),
            Err(InputError::TooLarge { .. })
        ));
        for bad in [
            "",
            "Acme",
            "acme/corp",
            "-acme",
            "acme-",
            "ac me",
            "a\0b",
            "..",
            "é",
        ] {
            assert!(TenantId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    // Goal: keys and values have named limits and clear errors.
    #[test]
    fn keys_and_values_are_limited() {
        assert!(RecordKey::parse("invoices/2026/0001.json").is_ok());
        assert!(RecordKey::parse("").is_err());
        assert!(RecordKey::parse("a\nb").is_err());
        let err = RecordKey::parse(&"k".repeat(KEY_LEN_MAX + 1)).unwrap_err();
        assert!(err.is_too_large());
        assert!(err.to_string().contains("1024"), "{err}");
        assert!(validate_value(b"x").is_ok());
        assert!(validate_value(b"").is_err());
        assert!(validate_value(&vec![0; VALUE_LEN_MAX + 1])
            .unwrap_err()
            .is_too_large());
        assert!(Collection::parse("orders_v2.archive").is_ok());
        assert!(Collection::parse("Orders").is_err());
    }
}
