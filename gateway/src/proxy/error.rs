//! Errors of the data path: what went wrong, who is to blame, and what the client sees.

use std::io;

use crate::runtime::service::Limit;

use crate::http::HttpError;

/// Who caused a failed exchange; decides the status and the log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The client sent something wrong or went away.
    Client,
    /// The upstream refused, failed or timed out.
    Upstream,
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
    /// The service's circuit breaker refused: it is at one of its limits.
    #[error("service {service} is at its circuitBreaker.{}; try again shortly", limit.field())]
    CircuitOpen { service: String, limit: Limit },
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
            | Self::UpstreamTls { .. }
            | Self::CircuitOpen { .. } => Blame::Upstream,
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
            Self::CircuitOpen { .. } => 503,
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
            Self::CircuitOpen { .. } => "circuit_open",
        }
    }
}
