//! TLS for `NBD_OPT_STARTTLS`, with rustls (ring as the crypto provider).
//!
//! ```text
//!   option haggling (plain) ── STARTTLS ─> ACK ─> TlsConfig::accept(socket, bytes already read)
//!                                                   │ rustls handshake (client cert checked
//!                                                   │ against --tls-ca when given)
//!                                                   ▼
//!                                 StreamOwned<ServerConnection, socket> ─> negotiation again
//! ```
//!
//! Invariants: when a server has a certificate, TLS is required (FORCEDTLS in the protocol's
//! words): nothing about the export is told and no request is served before the handshake
//! succeeds. With a CA, a client must present a certificate that chains to it.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ServerConnection, StreamOwned};

use crate::error::{Error, Result};
use crate::server::Stream;

/// A loaded server certificate, key and (optionally) client CA.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    config: Arc<rustls::ServerConfig>,
}

fn config_err(what: &str, path: &Path, e: impl std::fmt::Display) -> Error {
    Error::TlsConfig(format!("{what} {}: {e}", path.display()))
}

impl TlsConfig {
    /// Loads the certificate chain and private key (PEM) and, when `ca` is given, the CA
    /// certificates (PEM) client certificates must chain to.
    pub fn load(cert: &Path, key: &Path, ca: Option<&Path>) -> Result<TlsConfig> {
        let certs = CertificateDer::pem_file_iter(cert)
            .map_err(|e| config_err("certificate", cert, e))?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| config_err("certificate", cert, e))?;
        if certs.is_empty() {
            return Err(config_err(
                "certificate",
                cert,
                "no certificate in the file",
            ));
        }
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| config_err("key", key, e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::TlsConfig(e.to_string()))?;
        let builder = match ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(ca).map_err(|e| config_err("CA", ca, e))? {
                    let c = c.map_err(|e| config_err("CA", ca, e))?;
                    roots.add(c).map_err(|e| config_err("CA", ca, e))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|e| config_err("CA", ca, e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(certs, key_der)
            .map_err(|e| config_err("certificate and key", cert, e))?;
        Ok(TlsConfig {
            config: Arc::new(config),
        })
    }

    /// Runs the server side of the handshake on `stream` (`leftover`: bytes of it already
    /// read) and returns the encrypted stream.
    pub fn accept<S: Stream>(
        &self,
        mut stream: S,
        leftover: &[u8],
        peer: &str,
    ) -> Result<StreamOwned<ServerConnection, S>> {
        let tls_err = |source| Error::Tls {
            peer: peer.to_string(),
            source,
        };
        let mut conn = ServerConnection::new(self.config.clone())
            .map_err(|e| tls_err(std::io::Error::other(e)))?;
        let mut rest = leftover;
        while !rest.is_empty() {
            conn.read_tls(&mut rest).map_err(tls_err)?;
        }
        conn.process_new_packets()
            .map_err(|e| tls_err(std::io::Error::other(e)))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut stream).map_err(tls_err)?;
        }
        Ok(StreamOwned::new(conn, stream))
    }
}

impl<S: Stream> Stream for StreamOwned<ServerConnection, S> {
    fn set_read_timeout(&self, t: Option<std::time::Duration>) -> std::io::Result<()> {
        self.sock.set_read_timeout(t)
    }
}
