//! The client side of TLS (`nbds://`), with rustls: the CA and, optionally, a client
//! certificate come from the URI's `tls-certificates` directory, laid out as libnbd and
//! qemu-nbd expect (`ca-cert.pem`, `client-cert.pem`, `client-key.pem`).
//!
//! Invariant: the server is always verified: without a CA there is no TLS connection (no
//! "accept anything" mode), and the certificate must name the host (or `tls-hostname`).

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConnection, StreamOwned};

use crate::error::{ClientError, Result};
use crate::uri::{Endpoint, Uri};

/// Runs the TLS handshake on `sock` for `uri` and returns the encrypted stream.
pub fn connect<S: Read + Write>(sock: S, uri: &Uri) -> Result<StreamOwned<ClientConnection, S>> {
    let tls_err = |what: String| ClientError::Tls {
        peer: uri.text.clone(),
        what,
    };
    let dir = uri.tls_certificates.as_deref().ok_or_else(|| {
        tls_err("no CA to check the server with: add tls-certificates=DIR (DIR/ca-cert.pem)".into())
    })?;
    let config = client_config(dir).map_err(tls_err)?;
    let host = match (&uri.tls_hostname, &uri.endpoint) {
        (Some(h), _) => h.clone(),
        (None, Endpoint::Tcp { host, .. }) => host.clone(),
        (None, Endpoint::Unix(_)) => "localhost".into(),
    };
    let name = ServerName::try_from(host.clone())
        .map_err(|e| tls_err(format!("server name {host:?}: {e}")))?;
    let conn = ClientConnection::new(Arc::new(config), name)
        .map_err(|e| tls_err(format!("setup: {e}")))?;
    let mut stream = StreamOwned::new(conn, sock);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .map_err(|e| tls_err(format!("handshake: {e}")))?;
    }
    Ok(stream)
}

/// A client configuration trusting `dir/ca-cert.pem`, presenting `dir/client-cert.pem` with
/// `dir/client-key.pem` when both exist.
fn client_config(dir: &Path) -> std::result::Result<rustls::ClientConfig, String> {
    let ca = dir.join("ca-cert.pem");
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(&ca).map_err(|e| format!("{}: {e}", ca.display()))?;
    for c in certs {
        let c = c.map_err(|e| format!("{}: {e}", ca.display()))?;
        roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no certificate in the file", ca.display()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    let (cert, key) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
    if cert.is_file() && key.is_file() {
        let chain = CertificateDer::pem_file_iter(&cert)
            .map_err(|e| format!("{}: {e}", cert.display()))?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: {e}", cert.display()))?;
        let key_der =
            PrivateKeyDer::from_pem_file(&key).map_err(|e| format!("{}: {e}", key.display()))?;
        builder
            .with_client_auth_cert(chain, key_der)
            .map_err(|e| format!("{}: {e}", cert.display()))
    } else {
        Ok(builder.with_no_client_auth())
    }
}
