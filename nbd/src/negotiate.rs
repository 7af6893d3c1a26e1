//! Option haggling (fixed newstyle): from the client's flags to transmission, an abort, or a
//! TLS upgrade.
//!
//! ```text
//!   greeting ─> client flags ─> ┌─ option ─> reply(s) ─┐ ─> GO / EXPORT_NAME ─> transmission
//!                               └──────────<───────────┘ ─> ABORT ─> close
//!                                      │ STARTTLS (TLS required): ACK ─> caller wraps the
//!                                      ▼ socket, negotiation starts over with empty state
//! ```
//!
//! Invariants:
//! - Every option's data is length-checked before it is read: at most
//!   [`MAX_OPTION_LEN`](crate::protocol::MAX_OPTION_LEN) bytes are held, longer data is read
//!   and thrown away in small pieces and the option refused with `NBD_REP_ERR_TOO_BIG`.
//! - While TLS is required and not active, nothing about the export is revealed: every option
//!   but `STARTTLS` and `ABORT` gets `NBD_REP_ERR_TLS_REQD` (an `EXPORT_NAME`, which cannot be
//!   refused, closes the connection).
//! - A connection sends at most [`MAX_OPTIONS`] options; then it is closed.

use std::io::{Read, Write};

use crate::error::{Error, Result};
use crate::io::Framed;
use crate::protocol::{self as p, info, opt, rep};
use crate::server::Export;

/// Options one connection may send before it is closed.
pub const MAX_OPTIONS: u32 = 1024;

/// TLS state of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// The server has no certificate: `STARTTLS` is refused by policy.
    Off,
    /// TLS is required and not started yet.
    Required,
    /// The connection runs over TLS.
    Active,
}

/// What the client chose for the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected for the export.
    pub block_status: bool,
}

/// How option haggling ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Enter transmission.
    Transmit(Negotiated),
    /// `STARTTLS` was acknowledged: the caller upgrades the stream and negotiates again.
    StartTls,
    /// The client aborted.
    Closed,
}

/// Negotiation state of one connection (reset by a TLS upgrade).
#[derive(Debug)]
pub struct Negotiation<'a> {
    export: &'a Export,
    peer: &'a str,
    tls: Tls,
    no_zeroes: bool,
    structured: bool,
    /// Export name `base:allocation` was selected for, if it was.
    meta: Option<String>,
    options: u32,
}

impl<'a> Negotiation<'a> {
    /// Fresh state for a client that sent `client_flags`.
    pub fn new(export: &'a Export, peer: &'a str, tls: Tls, client_flags: u32) -> Self {
        Negotiation {
            export,
            peer,
            tls,
            no_zeroes: client_flags & p::FLAG_C_NO_ZEROES != 0,
            structured: false,
            meta: None,
            options: 0,
        }
    }

    fn io_err(&self, op: &'static str) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            peer: self.peer.to_string(),
            op,
            source,
        }
    }

    fn protocol(&self, what: impl Into<String>) -> Error {
        Error::Protocol {
            peer: self.peer.to_string(),
            what: what.into(),
        }
    }

    /// Reads options and answers them until the client enters transmission, aborts or starts
    /// TLS.
    pub fn run<S: Read + Write>(&mut self, io: &mut Framed<S>) -> Result<Outcome> {
        loop {
            let mut h = [0u8; p::OPTION_HEADER_LEN];
            io.read_exact(&mut h).map_err(self.io_err("read option"))?;
            let h = p::parse_option_header(&h).map_err(|source| Error::Parse {
                peer: self.peer.to_string(),
                what: "option header",
                source,
            })?;
            self.options += 1;
            if self.options > MAX_OPTIONS {
                return Err(self.protocol(format!("more than {MAX_OPTIONS} options")));
            }
            if h.len > p::MAX_OPTION_LEN {
                io.discard(h.len.into())
                    .map_err(self.io_err("read option data"))?;
                if h.option == opt::EXPORT_NAME {
                    return Err(self.protocol("export name longer than allowed"));
                }
                self.reply(io, h.option, rep::ERR_TOO_BIG, b"option data too long")?;
                continue;
            }
            let mut data = vec![0u8; h.len as usize];
            io.read_exact(&mut data)
                .map_err(self.io_err("read option data"))?;
            if self.tls == Tls::Required && !matches!(h.option, opt::STARTTLS | opt::ABORT) {
                if h.option == opt::EXPORT_NAME {
                    return Err(self.protocol("NBD_OPT_EXPORT_NAME before the required TLS"));
                }
                self.reply(io, h.option, rep::ERR_TLS_REQD, b"TLS is required")?;
                continue;
            }
            if let Some(outcome) = self.option(io, h.option, &data)? {
                io.flush().map_err(self.io_err("write option reply"))?;
                return Ok(outcome);
            }
            io.flush().map_err(self.io_err("write option reply"))?;
        }
    }

    /// Answers one option; `Some` when negotiation ends with it.
    fn option<S: Read + Write>(
        &mut self,
        io: &mut Framed<S>,
        option: u32,
        data: &[u8],
    ) -> Result<Option<Outcome>> {
        match option {
            opt::EXPORT_NAME => {
                let name = std::str::from_utf8(data).unwrap_or("\u{fffd}");
                if !self.export.matches(name) {
                    return Err(self.protocol(format!("no export named {name:?}")));
                }
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&self.export.size().to_be_bytes());
                b.extend_from_slice(&self.export.flags(self.structured).to_be_bytes());
                if !self.no_zeroes {
                    b.resize(b.len() + 124, 0);
                }
                io.send(&b).map_err(self.io_err("write export info"))?;
                return Ok(Some(Outcome::Transmit(self.negotiated(name))));
            }
            opt::ABORT => {
                // The client may already be gone: a failed ACK is no error.
                let _ = self
                    .reply(io, option, rep::ACK, &[])
                    .and_then(|()| io.flush().map_err(self.io_err("write")));
                return Ok(Some(Outcome::Closed));
            }
            opt::LIST if !data.is_empty() => {
                self.reply(io, option, rep::ERR_INVALID, b"LIST takes no data")?
            }
            opt::LIST => {
                let name = self.export.name.as_bytes();
                let mut d = Vec::with_capacity(4 + name.len());
                d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                d.extend_from_slice(name);
                if let Some(desc) = &self.export.description {
                    d.extend_from_slice(desc.as_bytes());
                }
                self.reply(io, option, rep::SERVER, &d)?;
                self.reply(io, option, rep::ACK, &[])?;
            }
            opt::STARTTLS if !data.is_empty() => {
                self.reply(io, option, rep::ERR_INVALID, b"STARTTLS takes no data")?
            }
            opt::STARTTLS => match self.tls {
                Tls::Off => self.reply(io, option, rep::ERR_POLICY, b"TLS is not configured")?,
                Tls::Active => self.reply(io, option, rep::ERR_INVALID, b"TLS already active")?,
                Tls::Required => {
                    self.reply(io, option, rep::ACK, &[])?;
                    return Ok(Some(Outcome::StartTls));
                }
            },
            opt::INFO | opt::GO => {
                let req = match p::parse_info_request(data) {
                    Ok(r) => r,
                    Err(e) => {
                        return self
                            .reply(io, option, rep::ERR_INVALID, e.to_string().as_bytes())
                            .map(|()| None)
                    }
                };
                if !self.export.matches(&req.name) {
                    let msg = format!("no export named {:?}", req.name);
                    self.reply(io, option, rep::ERR_UNKNOWN, msg.as_bytes())?;
                    return Ok(None);
                }
                let e = self.export;
                let export = p::info_export(e.size(), e.flags(self.structured));
                self.reply(io, option, rep::INFO, &export)?;
                let block = p::info_block_size(1, e.preferred_block(), p::MAX_PAYLOAD);
                self.reply(io, option, rep::INFO, &block)?;
                if req.requests.contains(&info::NAME) {
                    let name = p::info_string(info::NAME, &e.name);
                    self.reply(io, option, rep::INFO, &name)?;
                }
                if let (true, Some(desc)) =
                    (req.requests.contains(&info::DESCRIPTION), &e.description)
                {
                    let desc = p::info_string(info::DESCRIPTION, desc);
                    self.reply(io, option, rep::INFO, &desc)?;
                }
                self.reply(io, option, rep::ACK, &[])?;
                if option == opt::GO {
                    return Ok(Some(Outcome::Transmit(self.negotiated(&req.name))));
                }
            }
            opt::STRUCTURED_REPLY if !data.is_empty() => {
                self.reply(io, option, rep::ERR_INVALID, b"takes no data")?
            }
            opt::STRUCTURED_REPLY if self.structured => {
                self.reply(io, option, rep::ERR_INVALID, b"already negotiated")?
            }
            opt::STRUCTURED_REPLY => {
                self.structured = true;
                self.reply(io, option, rep::ACK, &[])?;
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                self.meta_context(io, option, data)?
            }
            _ => self.reply(io, option, rep::ERR_UNSUP, b"unknown option")?,
        }
        Ok(None)
    }

    /// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`: the one context offered is
    /// `base:allocation`.
    fn meta_context<S: Read + Write>(
        &mut self,
        io: &mut Framed<S>,
        option: u32,
        data: &[u8],
    ) -> Result<()> {
        let set = option == opt::SET_META_CONTEXT;
        if set {
            // Replaced by this request, even when it fails.
            self.meta = None;
        }
        if !self.structured {
            return self.reply(io, option, rep::ERR_INVALID, b"structured replies first");
        }
        let req = match p::parse_meta_request(data) {
            Ok(r) => r,
            Err(e) => return self.reply(io, option, rep::ERR_INVALID, e.to_string().as_bytes()),
        };
        if !self.export.matches(&req.name) {
            let msg = format!("no export named {:?}", req.name);
            return self.reply(io, option, rep::ERR_UNKNOWN, msg.as_bytes());
        }
        let selected = if set {
            req.queries.iter().any(|q| q == p::BASE_ALLOCATION)
        } else {
            req.queries.is_empty()
                || req
                    .queries
                    .iter()
                    .any(|q| q == "base:" || q == p::BASE_ALLOCATION)
        };
        if selected {
            let id = if set { p::BASE_ALLOCATION_ID } else { 0 };
            let mut d = id.to_be_bytes().to_vec();
            d.extend_from_slice(p::BASE_ALLOCATION.as_bytes());
            self.reply(io, option, rep::META_CONTEXT, &d)?;
            if set {
                self.meta = Some(req.name);
            }
        }
        self.reply(io, option, rep::ACK, &[])
    }

    fn negotiated(&self, name: &str) -> Negotiated {
        Negotiated {
            structured: self.structured,
            block_status: self.structured && self.meta.as_deref() == Some(name),
        }
    }

    fn reply<S: Read + Write>(
        &self,
        io: &mut Framed<S>,
        option: u32,
        kind: u32,
        data: &[u8],
    ) -> Result<()> {
        io.send(&p::option_reply(option, kind, data))
            .map_err(self.io_err("write option reply"))
    }
}
