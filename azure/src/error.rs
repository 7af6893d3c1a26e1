//! Errors of blob operations: each names the blob (without its SAS), the operation, and what
//! the service said, with a hint where the fix is known.

/// What went wrong, for callers that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The URL cannot be used.
    BadUrl,
    /// The blob (or its container) does not exist.
    NotFound,
    /// The blob exists and the request needed it not to.
    AlreadyExists,
    /// The SAS does not allow the request (expired, wrong signature, missing permission).
    Denied,
    /// Any other error status.
    Status,
    /// The connection failed or timed out.
    Transport,
    /// The server answered something that is not a valid answer.
    BadResponse,
}

/// An error of a blob operation.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The URL cannot be used.
    #[error("{url}: not a usable page-blob URL: {reason}")]
    BadUrl {
        /// The URL, without its query.
        url: String,
        /// Why.
        reason: String,
    },
    /// The service answered with an error status.
    #[error("{blob}: {op}: HTTP {status} {code}{}{}", message_part(.message), hint(.status, .code))]
    Status {
        /// The blob.
        blob: String,
        /// The operation (`Put Page at 4194304`, ...).
        op: String,
        /// HTTP status.
        status: u16,
        /// The service's error code (`x-ms-error-code`), or empty.
        code: String,
        /// The service's message, shortened.
        message: String,
    },
    /// The request did not get an answer (after retries).
    #[error("{blob}: {op}: {message}")]
    Transport {
        /// The blob.
        blob: String,
        /// The operation.
        op: String,
        /// What failed.
        message: String,
    },
    /// The answer is not valid.
    #[error("{blob}: {op}: invalid answer from the server: {what}")]
    BadResponse {
        /// The blob.
        blob: String,
        /// The operation.
        op: String,
        /// What is wrong with it.
        what: String,
    },
}

fn message_part(m: &str) -> String {
    if m.is_empty() {
        String::new()
    } else {
        format!(": {m}")
    }
}

fn hint(status: &u16, code: &str) -> &'static str {
    match (*status, code) {
        (403, "AuthenticationFailed") => {
            " (the SAS token is wrong or expired: get a new one, e.g. `az disk grant-access`)"
        }
        (403, _) => {
            " (the SAS token has expired or does not allow this: upload needs create and write \
             permissions, download read)"
        }
        (404, "ContainerNotFound") => " (create the container first)",
        (409, "BlobAlreadyExists") => " (use --force to replace it, or --resume to finish it)",
        _ => "",
    }
}

impl BlobError {
    /// The kind of error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            BlobError::BadUrl { .. } => ErrorKind::BadUrl,
            BlobError::Status { status: 404, .. } => ErrorKind::NotFound,
            BlobError::Status {
                status: 409, code, ..
            } if code == "BlobAlreadyExists" => ErrorKind::AlreadyExists,
            BlobError::Status {
                status: 401 | 403, ..
            } => ErrorKind::Denied,
            BlobError::Status { .. } => ErrorKind::Status,
            BlobError::Transport { .. } => ErrorKind::Transport,
            BlobError::BadResponse { .. } => ErrorKind::BadResponse,
        }
    }
}
