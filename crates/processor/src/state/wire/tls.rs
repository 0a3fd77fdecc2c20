//! `sslmode` → TLS connector, with libpq's meanings.
//!
//! tokio-postgres knows only disable/prefer/require and always verifies what its connector
//! verifies; the distinctions between modes (no verification, chain only, chain and host name)
//! live here, in the rustls configuration we hand it.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::state::config::connspec::{SslMode, SslSettings};
use crate::state::error::{StateError, StateResult};

/// What the connection layer needs to honour one server's `sslmode`.
#[derive(Clone)]
pub(crate) struct TlsSetup {
    pub mode: SslMode,
    /// The connector for TLS attempts; `None` only for `disable`.
    pub connector: Option<MakeRustlsConnect>,
}

impl TlsSetup {
    /// Builds the connector once (reading certificate files), so a bad file fails at `new()`.
    pub fn new(ssl: &SslSettings) -> StateResult<Self> {
        if ssl.mode == SslMode::Disable {
            return Ok(TlsSetup {
                mode: ssl.mode,
                connector: None,
            });
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verification = match ssl.mode {
            // libpq: when a root certificate is given, the non-verifying modes still check the
            // chain (as verify-ca does); `allow` and `prefer` then fall back to plaintext if
            // the check fails, `require` fails.
            SslMode::Allow | SslMode::Prefer | SslMode::Require if ssl.root_cert.is_some() => {
                Verification::ChainOnly
            }
            SslMode::Allow | SslMode::Prefer | SslMode::Require => Verification::None,
            SslMode::VerifyCa => Verification::ChainOnly,
            SslMode::VerifyFull | SslMode::Disable => Verification::Full,
        };
        let verifier: Arc<dyn ServerCertVerifier> = match verification {
            Verification::None => Arc::new(NoVerification(provider.clone())),
            Verification::ChainOnly | Verification::Full => {
                let path = ssl.root_cert.as_deref().ok_or_else(|| {
                    StateError::config("certificate verification needs a root certificate")
                })?;
                let roots = if ssl.system_roots() {
                    system_roots(&SYSTEM_STORES)?
                } else {
                    load_roots(path)?
                };
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| {
                            StateError::Tls(format!("root certificate {}: {e}", path.display()))
                        })?;
                if verification == Verification::ChainOnly {
                    Arc::new(ChainOnly(webpki))
                } else {
                    webpki
                }
            }
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| StateError::Tls(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (&ssl.client_cert, &ssl.client_key) {
            (Some(cert), Some(key)) => {
                let chain = load_certs(cert)?;
                let key = load_key(key, ssl.key_password)?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    StateError::Tls(format!("client certificate {}: {e}", cert.display()))
                })?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(TlsSetup {
            mode: ssl.mode,
            connector: Some(MakeRustlsConnect::new(config)),
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verification {
    None,
    ChainOnly,
    Full,
}

fn load_certs(path: &Path) -> StateResult<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            StateError::Tls(format!(
                "cannot read certificate file {}: {}",
                path.display(),
                pem_error(&e)
            ))
        })?;
    if certs.is_empty() {
        return Err(StateError::Tls(format!(
            "certificate file {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// Where operating systems keep their trust store as one PEM bundle, after `$SSL_CERT_FILE`
/// (which OpenSSL, and so libpq, honour): Debian and Ubuntu, Fedora and RHEL, Alpine and
/// macOS, SUSE.
const SYSTEM_STORES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
    "/etc/ssl/ca-bundle.pem",
];

/// `sslrootcert=system`: the operating system's trust store (the first bundle found).
/// Certificates webpki cannot use are skipped, as other clients do; a store without any
/// usable one is an error.
fn system_roots(stores: &[&str]) -> StateResult<RootCertStore> {
    let from_env = std::env::var_os("SSL_CERT_FILE").map(std::path::PathBuf::from);
    let path = from_env
        .into_iter()
        .chain(stores.iter().map(std::path::PathBuf::from))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            StateError::Tls(format!(
                "sslrootcert=system: no trust store found ($SSL_CERT_FILE, {}); install the \
                 Debian package ca-certificates",
                stores.join(", ")
            ))
        })?;
    let mut roots = RootCertStore::empty();
    let (added, _skipped) = roots.add_parsable_certificates(load_certs(&path)?);
    if added == 0 {
        return Err(StateError::Tls(format!(
            "sslrootcert=system: no usable certificate in {}",
            path.display()
        )));
    }
    Ok(roots)
}

/// Loads a client key as libpq would accept it: not readable by group or others (by group
/// only when root owns it), and not encrypted (pgstate does not decrypt keys).
fn load_key(path: &Path, password_given: bool) -> StateResult<PrivateKeyDer<'static>> {
    check_key_permissions(path)?;
    let text = std::fs::read(path)
        .map_err(|e| StateError::Tls(format!("cannot read client key {}: {e}", path.display())))?;
    let encrypted = |marker: &[u8]| text.windows(marker.len()).any(|w| w == marker);
    if encrypted(b"ENCRYPTED PRIVATE KEY") || encrypted(b"Proc-Type: 4,ENCRYPTED") {
        return Err(StateError::Tls(format!(
            "client key {} is encrypted{}: pgstate does not decrypt private keys; store it \
             decrypted with permissions 0600 (openssl pkey -in KEY -out KEY.plain)",
            path.display(),
            if password_given {
                " (sslpassword was given)"
            } else {
                ""
            }
        )));
    }
    PrivateKeyDer::from_pem_slice(&text).map_err(|e| {
        StateError::Tls(format!(
            "cannot read client key {}: {}",
            path.display(),
            pem_error(&e)
        ))
    })
}

/// libpq's rule for private key files: no permissions for group or others (0600 or less);
/// group read allowed (0640 or less) when root owns the file.
#[cfg(unix)]
fn check_key_permissions(path: &Path) -> StateResult<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| StateError::Tls(format!("cannot read client key {}: {e}", path.display())))?;
    let mode = meta.mode() & 0o777;
    // No group or other bits; for a root-owned key, group read is allowed.
    let forbidden = if meta.uid() == 0 { 0o037 } else { 0o077 };
    if mode & forbidden != 0 {
        return Err(StateError::Tls(format!(
            "client key {} has permissions {mode:04o}: it must be readable by its owner only \
             (chmod 0600{})",
            path.display(),
            if meta.uid() == 0 {
                ", or 0640 owned by root"
            } else {
                ""
            }
        )));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_key_permissions(_path: &Path) -> StateResult<()> {
    Ok(())
}

fn load_roots(path: &Path) -> StateResult<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| StateError::Tls(format!("root certificate {}: {e}", path.display())))?;
    }
    Ok(roots)
}

/// Describes a PEM error without echoing file contents (a key file must never reach a log).
fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(io) => io.to_string(),
        Error::NoItemsFound => "no PEM item of the expected kind found".to_string(),
        _ => "malformed PEM".to_string(),
    }
}

/// `prefer`/`require`/`allow` without a root certificate: libpq encrypts but does not
/// authenticate the server. Handshake signatures are still checked.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the host name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // webpki checks the chain first and the name last, so a name mismatch means the chain
        // was good.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
