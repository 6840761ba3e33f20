//! TLS material, secret files and client credentials.
//!
//! - Peers (node ↔ node) use mutual TLS: the server requires a client certificate issued by the
//!   cluster CA, and the client verifies the server against the same CA.
//! - Clients use TLS (server verified against the cluster CA) plus a bearer token.
//! - TLS 1.2 and 1.3 only (rustls supports nothing older).
//! - Secret files (private keys, tokens) must not be readable by group or others; their contents
//!   are never logged and the types holding them do not implement `Debug` with their contents.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// Largest secret or certificate file (private key, token, certificate, CA) read, in bytes;
/// real ones are a few KiB at most.
pub const SECRET_FILE_BYTES_MAX: u64 = 256 * 1024;
/// Shortest accepted token, in bytes, so a weak credential cannot be configured by accident.
pub const TOKEN_LEN_MIN: usize = 24;
/// Metadata key carrying the client credential.
pub const AUTHORIZATION: &str = "authorization";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "secret file {path} has mode {mode:o}: it must not be readable by group or others (run: chmod 600 {path})"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// Reads a key, token or certificate file of at most [`SECRET_FILE_BYTES_MAX`] bytes (a path
/// naming something else, such as /dev/zero, is refused rather than read without end).
fn read_file(path: &Path) -> Result<Vec<u8>, AuthError> {
    use std::io::Read;
    let read_err = |cause| AuthError::Read {
        path: path.to_path_buf(),
        cause,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(read_err)?
        .take(SECRET_FILE_BYTES_MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > SECRET_FILE_BYTES_MAX {
        return Err(AuthError::Invalid {
            path: path.to_path_buf(),
            reason: format!("larger than {SECRET_FILE_BYTES_MAX} bytes"),
        });
    }
    Ok(bytes)
}

/// Reads a CA file ([`read_file`]) and checks it with [`ca_roots`], so a wrong file is named
/// at start instead of failing every TLS handshake later (tonic drops what it cannot parse).
pub fn read_ca(path: &Path) -> Result<Vec<u8>, AuthError> {
    let pem = read_file(path)?;
    ca_roots(&pem).map_err(|reason| AuthError::Invalid {
        path: path.to_path_buf(),
        reason,
    })?;
    Ok(pem)
}

/// The trust anchors in a CA's PEM: at least one certificate, each usable as a CA.
pub fn ca_roots(pem: &[u8]) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no PEM certificate found".into());
    }
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|e| format!("certificate {} is not usable as a CA: {e}", i + 1))?;
    }
    Ok(roots)
}

/// Reads a secret file after checking that only its owner can read it.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>, AuthError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|cause| AuthError::Read {
        path: path.to_path_buf(),
        cause,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(AuthError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    if meta.len() > SECRET_FILE_BYTES_MAX {
        return Err(AuthError::Invalid {
            path: path.to_path_buf(),
            reason: format!("{} bytes is too large for a secret", meta.len()),
        });
    }
    read_file(path)
}

/// Writes a secret file readable by its owner only (mode 0600), whole or not at all: a
/// crash leaves the old file or the new one, never a truncated secret a later start trusts.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut replacement = crate::store::Replacement::new(path, true)?;
    replacement.file().write_all(contents)?;
    replacement.commit()
}

/// A node's TLS material: the cluster CA and its own certificate and key.
#[derive(Clone)]
pub struct NodeTls {
    ca_pem: Vec<u8>,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
}

impl NodeTls {
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, AuthError> {
        let ca_pem = read_ca(ca)?;
        let cert_pem = read_file(cert)?;
        let key_pem = read_secret_file(key)?;
        if !String::from_utf8_lossy(&cert_pem).contains("BEGIN CERTIFICATE") {
            return Err(AuthError::Invalid {
                path: cert.to_path_buf(),
                reason: "no PEM certificate found".into(),
            });
        }
        if !String::from_utf8_lossy(&key_pem).contains("PRIVATE KEY") {
            return Err(AuthError::Invalid {
                path: key.to_path_buf(),
                reason: "no PEM private key found".into(),
            });
        }
        Ok(Self {
            ca_pem,
            cert_pem,
            key_pem,
        })
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }

    /// The peer listener: only clients holding a certificate from the cluster CA get in.
    pub fn peer_server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity())
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(false)
    }

    /// The client listener: TLS; clients authenticate with a credential.
    pub fn client_server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(self.identity())
    }

    /// Outgoing peer connections: verify the peer against the CA, present our certificate.
    pub fn peer_client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(self.identity())
    }

    /// rustls config for the HTTP listener (metrics, health).
    pub fn http_server(&self) -> Result<Arc<rustls::ServerConfig>, AuthError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let invalid = |reason: String| AuthError::Invalid {
            path: PathBuf::from("<node certificate>"),
            reason,
        };
        let certs = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(e.to_string()))?;
        let key =
            PrivateKeyDer::from_pem_slice(&self.key_pem).map_err(|e| invalid(e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| invalid(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| invalid(e.to_string()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// The token of an `authorization: Bearer <token>` value; the scheme's name is
/// case-insensitive (RFC 7235), as HTTP clients may send it either way.
pub fn bearer(value: &str) -> Option<&str> {
    value
        .get(..7)
        .filter(|scheme| scheme.eq_ignore_ascii_case("bearer "))
        .map(|_| &value[7..])
}

/// A client credential as the server holds it: only its blake3 hash, compared in constant time.
#[derive(Clone)]
pub struct TokenCheck {
    hash: blake3::Hash,
}

impl TokenCheck {
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        let token = read_token(path)?;
        Ok(Self {
            hash: blake3::hash(token.as_bytes()),
        })
    }

    /// Whether `presented` is the token (constant-time: blake3::Hash equality is).
    pub fn matches(&self, presented: &str) -> bool {
        blake3::hash(presented.as_bytes()) == self.hash
    }

    /// Interceptor for client services: `authorization: Bearer <token>`.
    #[allow(clippy::result_large_err)]
    pub fn check(&self, req: Request<()>) -> Result<Request<()>, Status> {
        let presented = req
            .metadata()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer)
            .ok_or_else(|| {
                Status::unauthenticated("missing credential: send 'authorization: Bearer <token>'")
            })?;
        if self.matches(presented) {
            Ok(req)
        } else {
            Err(Status::unauthenticated("invalid credential"))
        }
    }
}

/// Reads and validates a token file (owner-only permissions, printable, long enough).
pub fn read_token(path: &Path) -> Result<String, AuthError> {
    let raw = read_secret_file(path)?;
    let token = String::from_utf8(raw)
        .map_err(|_| AuthError::Invalid {
            path: path.to_path_buf(),
            reason: "token is not UTF-8".into(),
        })?
        .trim()
        .to_string();
    if token.len() < TOKEN_LEN_MIN || !token.chars().all(|c| c.is_ascii_graphic()) {
        return Err(AuthError::Invalid {
            path: path.to_path_buf(),
            reason: format!(
                "a token is at least {TOKEN_LEN_MIN} printable ASCII characters without spaces"
            ),
        });
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: secrets readable by others are refused with a message that says how to fix it.
    #[test]
    fn secret_files_need_owner_only_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        write_secret_file(&path, b"0123456789abcdef0123456789abcdef").unwrap();
        assert!(read_token(&path).is_ok());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_token(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "short").unwrap();
        assert!(read_token(&path).is_err());
    }

    // Goal: a CA file that holds no usable certificate, or a path that never ends, is named at
    // start with the reason (tonic would drop it silently and every handshake would fail).
    #[test]
    fn ca_files_must_hold_usable_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| dir.path().join(name);
        let ca = crate::pki::Ca::generate().unwrap();
        let (node_cert, _) = ca.issue("node1", &["localhost".into()]).unwrap();
        std::fs::write(at("ca.pem"), ca.cert_pem()).unwrap();
        assert_eq!(read_ca(&at("ca.pem")).unwrap(), ca.cert_pem().as_bytes());
        // Two certificates (a CA rollover) are fine.
        std::fs::write(at("two.pem"), format!("{}{node_cert}", ca.cert_pem())).unwrap();
        assert!(read_ca(&at("two.pem")).is_ok());
        // Valid PEM around bytes that are no certificate ("hello").
        let not_der = "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n";
        for (name, content, why) in [
            ("empty.pem", "", "no PEM certificate"),
            ("text.pem", "not a certificate\n", "no PEM certificate"),
            (
                "not-der.pem",
                not_der,
                "certificate 1 is not usable as a CA",
            ),
        ] {
            std::fs::write(at(name), content).unwrap();
            let err = read_ca(&at(name)).unwrap_err().to_string();
            assert!(err.contains(why), "{name}: {err}");
            assert!(err.contains(name), "{err}");
        }
        let err = read_ca(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(err.contains("larger than"), "{err}");
    }

    // Goal: only the exact token passes the interceptor.
    #[test]
    fn token_check_accepts_only_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        let token = "0123456789abcdef0123456789abcdef";
        write_secret_file(&path, token.as_bytes()).unwrap();
        let check = TokenCheck::from_file(&path).unwrap();
        let mut ok = Request::new(());
        ok.metadata_mut()
            .insert(AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        assert!(check.check(ok).is_ok());
        let mut bad = Request::new(());
        bad.metadata_mut()
            .insert(AUTHORIZATION, "Bearer nope".parse().unwrap());
        assert_eq!(
            check.check(bad).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            check.check(Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
