//! NBD URIs, in libnbd's forms (its `nbd_connect_uri` documentation):
//!
//! ```text
//!   nbd://HOST[:PORT]/[EXPORT]              TCP, port 10809 by default
//!   nbds://HOST[:PORT]/[EXPORT]             TCP, TLS required (NBD_OPT_STARTTLS)
//!   nbd+unix:///[EXPORT]?socket=PATH        Unix socket
//!   nbds+unix:///[EXPORT]?socket=PATH       Unix socket, TLS required
//!   query keys: socket=PATH  tls-certificates=DIR (ca-cert.pem, client-cert.pem, client-key.pem)
//!               tls-hostname=NAME (name the server certificate must carry)
//!               timeout=SECONDS (vhdkit: how long to wait on a silent server; default 30)
//! ```
//!
//! The export name is the path after the first `/`, percent-decoded (`nbd://h/` and `nbd://h`
//! both name the default export `""`). Unknown query keys are refused rather than ignored, so
//! a misspelt option never silently changes what is connected to.

use std::path::PathBuf;
use std::time::Duration;

/// The NBD port.
pub const DEFAULT_PORT: u16 = 10809;
/// How long a server may stay silent by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The URI schemes, with whether they use TLS and a Unix socket.
const SCHEMES: [(&str, bool, bool); 4] = [
    ("nbd://", false, false),
    ("nbds://", true, false),
    ("nbd+unix://", false, true),
    ("nbds+unix://", true, true),
];

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP host (name, IPv4 or IPv6 address without brackets) and port.
    Tcp {
        /// Host.
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix socket.
    Unix(PathBuf),
}

/// A parsed NBD URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uri {
    /// The URI as given (for messages and parent locators).
    pub text: String,
    /// Where to connect.
    pub endpoint: Endpoint,
    /// Export name.
    pub export: String,
    /// TLS required (`nbds`).
    pub tls: bool,
    /// Directory of PEM files for TLS (`tls-certificates`).
    pub tls_certificates: Option<PathBuf>,
    /// Name the server certificate must carry (default: the host, or `localhost` on a socket).
    pub tls_hostname: Option<String>,
    /// How long to wait on a silent server before giving up.
    pub timeout: Duration,
}

/// Why a string is not a usable NBD URI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{uri}: not a usable NBD URI: {why}")]
pub struct UriError {
    /// The string.
    pub uri: String,
    /// What is wrong.
    pub why: String,
}

impl Uri {
    /// True if `s` starts with an NBD URI scheme (whether or not the rest parses).
    pub fn is_nbd_uri(s: &str) -> bool {
        SCHEMES.iter().any(|(scheme, _, _)| s.starts_with(scheme))
    }

    /// Parses `s`.
    pub fn parse(s: &str) -> Result<Uri, UriError> {
        let bad = |why: String| UriError {
            uri: s.to_string(),
            why,
        };
        let Some(&(scheme, tls, unix)) = SCHEMES.iter().find(|(sc, _, _)| s.starts_with(sc)) else {
            return Err(bad(
                "the scheme is not nbd, nbds, nbd+unix or nbds+unix".into()
            ));
        };
        let rest = &s[scheme.len()..];
        let (rest, fragment) = rest.split_once('#').unwrap_or((rest, ""));
        if !fragment.is_empty() {
            return Err(bad("a fragment (#...) has no meaning here".into()));
        }
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = decode(path).map_err(bad)?;
        let mut socket = None;
        let mut tls_certificates = None;
        let mut tls_hostname = None;
        let mut timeout = DEFAULT_TIMEOUT;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = decode(v).map_err(bad)?;
            match k {
                "socket" => socket = Some(PathBuf::from(v)),
                "tls-certificates" => tls_certificates = Some(PathBuf::from(v)),
                "tls-hostname" => tls_hostname = Some(v),
                "timeout" => {
                    let secs: f64 = v
                        .parse()
                        .ok()
                        .filter(|t: &f64| t.is_finite() && *t > 0.0 && *t <= 86400.0)
                        .ok_or_else(|| bad(format!("timeout={v}: seconds from 0 to 86400")))?;
                    timeout = Duration::from_secs_f64(secs);
                }
                other => return Err(bad(format!("unknown query key {other:?}"))),
            }
        }
        let endpoint = if unix {
            if !authority.is_empty() {
                return Err(bad(format!(
                    "a Unix socket URI has no host ({authority:?}): write {scheme}/NAME?socket=PATH"
                )));
            }
            Endpoint::Unix(socket.ok_or_else(|| bad("socket=PATH is missing".into()))?)
        } else {
            if socket.is_some() {
                return Err(bad(
                    "socket= only goes with nbd+unix:// or nbds+unix://".into()
                ));
            }
            let (host, port) = split_host_port(authority).map_err(bad)?;
            Endpoint::Tcp { host, port }
        };
        Ok(Uri {
            text: s.to_string(),
            endpoint,
            export,
            tls,
            tls_certificates,
            tls_hostname,
            timeout,
        })
    }

    /// The peer as errors name it: the URI.
    pub fn peer(&self) -> &str {
        &self.text
    }
}

/// `host[:port]`, `[v6]` or `[v6]:port`.
fn split_host_port(a: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("unclosed '[' in {a:?}"))?;
        match after {
            "" => (h, None),
            p => (
                h,
                Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("junk after ']' in {a:?}"))?,
                ),
            ),
        }
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        }
    };
    if host.is_empty() {
        return Err("the host is missing".into());
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p
            .parse()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| format!("port {p:?} is not a number from 1 to 65535"))?,
    };
    Ok((host.to_string(), port))
}

/// Percent-decoding (UTF-8 result).
fn decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape at byte {i} of {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_uri_with_port_and_export_name_parses() {
        let u = Uri::parse("nbd://example.org:10810/disk%201").unwrap();
        assert_eq!(
            u.endpoint,
            Endpoint::Tcp {
                host: "example.org".into(),
                port: 10810
            }
        );
        assert_eq!(u.export, "disk 1");
        assert!(!u.tls);
    }

    #[test]
    fn tcp_uri_without_port_or_export_uses_the_defaults() {
        for s in ["nbd://h", "nbd://h/"] {
            let u = Uri::parse(s).unwrap();
            assert_eq!(
                u.endpoint,
                Endpoint::Tcp {
                    host: "h".into(),
                    port: DEFAULT_PORT
                }
            );
            assert_eq!(u.export, "");
        }
    }

    #[test]
    fn ipv6_host_in_brackets_parses() {
        let u = Uri::parse("nbds://[::1]:7000/x").unwrap();
        assert_eq!(
            u.endpoint,
            Endpoint::Tcp {
                host: "::1".into(),
                port: 7000
            }
        );
        assert!(u.tls);
    }

    #[test]
    fn unix_uri_takes_the_socket_from_the_query() {
        let u = Uri::parse("nbd+unix:///base?socket=/run/s.sock&timeout=2.5").unwrap();
        assert_eq!(u.endpoint, Endpoint::Unix("/run/s.sock".into()));
        assert_eq!(u.export, "base");
        assert_eq!(u.timeout, Duration::from_millis(2500));
    }

    #[test]
    fn bad_uris_are_refused_with_the_reason() {
        for (s, why) in [
            ("nbd+unix:///x", "socket=PATH is missing"),
            ("nbd://h:0/", "port"),
            ("nbd://h:99999/", "port"),
            ("nbd://h/?sockett=/x", "unknown query key"),
            ("nbd:///x", "host is missing"),
            ("nbd://h/%zz", "percent escape"),
            ("nbd://h/?timeout=-1", "timeout"),
            ("nbd+unix://host/?socket=/s", "no host"),
            ("http://h/", "scheme"),
        ] {
            let e = Uri::parse(s).unwrap_err();
            assert!(e.why.contains(why), "{s}: {e}");
        }
    }
}
