//! Certificate generation for the dev cluster and for `scripts/pki.sh` (real deployments that
//! do not have their own CA yet). Production may equally bring certificates from any CA.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::auth::write_secret_file;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {path}: {cause}")]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot read the CA from {path}: {reason}")]
    ReadCa { path: PathBuf, reason: String },
}

/// A certificate authority able to issue node certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

/// Subject of every CA this code generates. A loaded CA is rebuilt from this subject and its
/// key: certificates it issues name the same issuer and carry the key's identifier, so they
/// chain to the original CA certificate.
pub const CA_COMMON_NAME: &str = "escrow cluster CA";

fn ca_params() -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

impl Ca {
    /// A new CA with a fresh key.
    pub fn generate() -> Result<Self, PkiError> {
        let params = ca_params()?;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA certificate and key written by [`Ca::write`].
    pub fn load(cert: &Path, key: &Path) -> Result<Self, PkiError> {
        let err = |path: &Path, reason: String| PkiError::ReadCa {
            path: path.to_path_buf(),
            reason,
        };
        let cert_pem = crate::auth::read_ca(cert).map_err(|e| err(cert, e.to_string()))?;
        let cert_pem = String::from_utf8(cert_pem).map_err(|e| err(cert, e.to_string()))?;
        let key_pem = crate::auth::read_secret_file(key).map_err(|e| err(key, e.to_string()))?;
        let key_pem = String::from_utf8(key_pem).map_err(|e| err(key, e.to_string()))?;
        let key_pair = KeyPair::from_pem(&key_pem).map_err(|e| err(key, e.to_string()))?;
        let ca = Self {
            issuer: Issuer::new(ca_params()?, key_pair),
            cert_pem,
        };
        // What it issues must chain to the certificate on disk: a key of another CA, or a
        // certificate this code did not write (another subject), would hand out node
        // certificates every peer refuses ("unknown issuer") long after this command succeeded.
        ca.check_issues_chaining().map_err(|reason| {
            err(
                key,
                format!(
                    "certificates issued with this key do not verify against {} ({reason}); \
                     the key and certificate must be a pair this command wrote",
                    cert.display()
                ),
            )
        })?;
        Ok(ca)
    }

    /// Issues a throwaway certificate and verifies it against this CA's certificate.
    fn check_issues_chaining(&self) -> Result<(), String> {
        use rustls::client::danger::ServerCertVerifier;
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
        let roots = crate::auth::ca_roots(self.cert_pem.as_bytes())?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| e.to_string())?;
        let (probe, _) = self
            .issue("escrow CA check", &["localhost".into()])
            .map_err(|e| e.to_string())?;
        let probe = CertificateDer::from_pem_slice(probe.as_bytes()).map_err(|e| e.to_string())?;
        let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
        verifier
            .verify_server_cert(&probe, &[], &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn write(&self, cert: &Path, key: &Path) -> Result<(), PkiError> {
        write_public(cert, self.cert_pem.as_bytes())?;
        write_secret_file(key, self.issuer.key().serialize_pem().as_bytes()).map_err(|cause| {
            PkiError::Write {
                path: key.to_path_buf(),
                cause,
            }
        })
    }

    /// Issues a certificate usable both as TLS server and TLS client (nodes are both), valid
    /// for the given DNS names and IP addresses.
    pub fn issue(&self, common_name: &str, names: &[String]) -> Result<(String, String), PkiError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        for name in names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.clone().try_into()?),
            };
            params.subject_alt_names.push(san);
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Issues a certificate and writes it with its key (key mode 0600).
    pub fn issue_to_files(
        &self,
        common_name: &str,
        names: &[String],
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<(), PkiError> {
        let (cert, key) = self.issue(common_name, names)?;
        write_public(cert_path, cert.as_bytes())?;
        write_secret_file(key_path, key.as_bytes()).map_err(|cause| PkiError::Write {
            path: key_path.to_path_buf(),
            cause,
        })
    }
}

/// Writes a certificate whole or not at all (a half certificate beside its key would fail
/// every later start).
fn write_public(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    crate::store::write_atomically(path, contents).map_err(|cause| PkiError::Write {
        path: path.to_path_buf(),
        cause,
    })
}

/// A fresh random credential: 32 bytes as 64 hex characters.
pub fn generate_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    crate::domain::hex_bytes(&bytes)
}

/// Writes a fresh token to `path` (mode 0600) unless a file is there already; returns whether
/// it wrote one.
pub fn write_token_unless_present(path: &Path) -> std::io::Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    write_secret_file(path, generate_token().as_bytes())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: a CA loaded from disk issues certificates that chain to the certificate there; a
    // key of another CA is refused at load with the reason, not found out later as "unknown
    // issuer" on every peer connection.
    #[test]
    fn a_loaded_ca_must_be_the_pair_written() {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| dir.path().join(name);
        let ca = Ca::generate().unwrap();
        ca.write(&at("ca.pem"), &at("ca.key")).unwrap();
        let loaded = Ca::load(&at("ca.pem"), &at("ca.key")).unwrap();
        assert_eq!(loaded.cert_pem(), ca.cert_pem());

        let other = Ca::generate().unwrap();
        other.write(&at("other.pem"), &at("other.key")).unwrap();
        let Err(err) = Ca::load(&at("ca.pem"), &at("other.key")) else {
            panic!("a key of another CA was accepted");
        };
        let err = err.to_string();
        assert!(err.contains("do not verify against"), "{err}");
        assert!(err.contains("other.key"), "{err}");
    }
}
