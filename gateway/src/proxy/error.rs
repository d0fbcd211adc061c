//! Errors of the data path: what went wrong, who is to blame, and what the client sees.

use std::io;

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
    /// Transfer-Encoding whose final coding is not exactly one `chunked`, or on HTTP/1.0.
    #[error("Transfer-Encoding other than a final chunked")]
    BadTransferEncoding,
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
            Self::BadTransferEncoding => 501,
            _ => 400,
        }
    }
}

/// Who caused a failed exchange; decides the status and the log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The client sent something wrong or went away.
    Client,
    /// The upstream refused, failed or timed out.
    Upstream,
    /// The gateway itself failed.
    Internal,
}

/// A failed proxied exchange.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The client's request broke the protocol.
    #[error("bad request: {0}")]
    Client(#[from] HttpError),
    /// The client did not send a complete head in time.
    #[error("client sent no complete request head in time")]
    ClientTimeout,
    /// The client's connection failed or closed mid-request.
    #[error("client connection: {0}")]
    ClientIo(#[source] io::Error),
    /// A declared request body exceeds the API's limit.
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    /// No endpoint of the service accepted a connection.
    #[error("no endpoint of service {service} reachable: {source}")]
    Connect {
        service: String,
        #[source]
        source: io::Error,
    },
    /// Connecting to the upstream did not finish in time.
    #[error("connecting to {endpoint} timed out")]
    ConnectTimeout { endpoint: String },
    /// The upstream did not answer in time.
    #[error("upstream {endpoint} did not respond in time")]
    UpstreamTimeout { endpoint: String },
    /// The upstream connection failed mid-exchange.
    #[error("upstream {endpoint}: {source}")]
    UpstreamIo {
        endpoint: String,
        #[source]
        source: io::Error,
    },
    /// The upstream answered something that is not valid HTTP/1.1.
    #[error("upstream {endpoint} sent an invalid response: {source}")]
    UpstreamProtocol {
        endpoint: String,
        #[source]
        source: HttpError,
    },
    /// TLS with the upstream failed.
    #[error("TLS with upstream {endpoint}: {source}")]
    UpstreamTls {
        endpoint: String,
        #[source]
        source: io::Error,
    },
}

impl ProxyError {
    /// Who is to blame.
    pub fn blame(&self) -> Blame {
        match self {
            Self::Client(_) | Self::ClientTimeout | Self::ClientIo(_) | Self::BodyTooLarge { .. } => {
                Blame::Client
            }
            Self::Connect { .. }
            | Self::ConnectTimeout { .. }
            | Self::UpstreamTimeout { .. }
            | Self::UpstreamIo { .. }
            | Self::UpstreamProtocol { .. }
            | Self::UpstreamTls { .. } => Blame::Upstream,
        }
    }

    /// Status for the client, if a response can still be sent.
    pub fn status(&self) -> u16 {
        match self {
            Self::Client(e) => e.status(),
            Self::ClientTimeout => 408,
            Self::ClientIo(_) => 400,
            Self::BodyTooLarge { .. } => 413,
            Self::ConnectTimeout { .. } | Self::UpstreamTimeout { .. } => 504,
            Self::Connect { .. }
            | Self::UpstreamIo { .. }
            | Self::UpstreamProtocol { .. }
            | Self::UpstreamTls { .. } => 502,
        }
    }

    /// Short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Client(_) => "bad_request",
            Self::ClientTimeout => "client_timeout",
            Self::ClientIo(_) => "client_io",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::Connect { .. } => "connect",
            Self::ConnectTimeout { .. } => "connect_timeout",
            Self::UpstreamTimeout { .. } => "timeout",
            Self::UpstreamIo { .. } => "io",
            Self::UpstreamProtocol { .. } => "protocol",
            Self::UpstreamTls { .. } => "tls",
        }
    }
}
