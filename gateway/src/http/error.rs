//! What breaks HTTP/1.1 framing, and the status a client gets for it.

/// A request or response head or body that breaks HTTP/1.1 framing rules.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum HttpError {
    /// The request line exceeds the configured limit.
    #[error("request line longer than {limit} bytes")]
    RequestLineTooLong { limit: usize },
    /// The head exceeds the configured limit.
    #[error("request head larger than {limit} bytes")]
    HeadTooLarge { limit: usize },
    /// More header fields than the configured limit.
    #[error("more than {limit} header fields")]
    TooManyHeaders { limit: usize },
    /// A line ended by LF alone.
    #[error("bare LF in head")]
    BareLineFeed,
    /// A CR not followed by LF.
    #[error("bare CR in head")]
    BareCarriageReturn,
    /// A NUL byte in the head.
    #[error("NUL byte in head")]
    NulInHead,
    /// A header line continued with obsolete line folding.
    #[error("obsolete line folding")]
    ObsFold,
    /// Method is not a token, or is CONNECT.
    #[error("invalid method")]
    BadMethod,
    /// Target is not origin-form, absolute-form or `*` for OPTIONS.
    #[error("invalid request target")]
    BadTarget,
    /// Version other than HTTP/1.0 or HTTP/1.1.
    #[error("unsupported HTTP version")]
    BadVersion,
    /// Host missing (HTTP/1.1), repeated or malformed.
    #[error("missing, repeated or invalid Host")]
    BadHost,
    /// Content-Length and Transfer-Encoding together.
    #[error("Content-Length together with Transfer-Encoding")]
    ContentLengthWithTransferEncoding,
    /// More than one Content-Length field.
    #[error("more than one Content-Length")]
    DuplicateContentLength,
    /// A Content-Length that is not a plain decimal number.
    #[error("invalid Content-Length")]
    BadContentLength,
    /// Transfer-Encoding whose final coding is not exactly one `chunked`, or
    /// on HTTP/1.0: the body's length cannot be known (RFC 9112 §6.3), 400.
    #[error("Transfer-Encoding other than a final chunked")]
    BadTransferEncoding,
    /// A final `chunked` under a coding that is not registered (or is
    /// `identity`): not understood (RFC 9112 §6.1), 501.
    #[error("Transfer-Encoding with a coding the gateway does not know")]
    UnknownTransferCoding,
    /// A malformed chunk in a chunked body.
    #[error("bad chunked encoding: {0}")]
    BadChunk(&'static str),
    /// Any other structural problem found by httparse.
    #[error("malformed head: {0}")]
    Parse(httparse::Error),
    /// Any other structural problem.
    #[error("malformed head: {0}")]
    Malformed(&'static str),
}

impl HttpError {
    /// Status the gateway answers a client with for this error.
    pub fn status(&self) -> u16 {
        match self {
            Self::RequestLineTooLong { .. } => 414,
            Self::HeadTooLarge { .. } | Self::TooManyHeaders { .. } => 431,
            Self::UnknownTransferCoding => 501,
            _ => 400,
        }
    }
}
