//! The source gateway's expressions that policies accept in their
//! configuration (`#[attributes.headers['client_id']]` and the like), parsed
//! in one place so every policy accepts and refuses the same forms.

use super::PolicyError;

/// A supported expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Expr {
    /// `#[attributes.headers['NAME']]`: a request header (name lowercased).
    Header(String),
    /// `#[attributes.queryParams['NAME']]`: a query parameter.
    Query(String),
    /// `#[attributes.remoteAddress]`: the client's address.
    RemoteAddress,
    /// `#[attributes.requestPath]`.
    RequestPath,
    /// `#[attributes.method]`.
    Method,
    /// `#[authentication.clientId]`: the client application an earlier policy authenticated.
    ClientId,
}

/// The `NAME` of `prefix NAME']`, if it is a plain name.
fn named<'a>(inner: &'a str, prefix: &str) -> Option<&'a str> {
    inner
        .strip_prefix(prefix)
        .and_then(|r| r.strip_suffix("']"))
        .filter(|n| !n.is_empty() && !n.contains(['\'', '[', ']']))
}

impl Expr {
    /// Parses `text`; `None` when it is not one of the supported forms.
    pub fn parse(text: &str) -> Option<Self> {
        let inner = text.trim().strip_prefix("#[")?.strip_suffix(']')?;
        match inner {
            "attributes.remoteAddress" => Some(Self::RemoteAddress),
            "attributes.requestPath" => Some(Self::RequestPath),
            "attributes.method" => Some(Self::Method),
            "authentication.clientId" => Some(Self::ClientId),
            _ => named(inner, "attributes.headers['")
                .map(|n| Self::Header(n.to_ascii_lowercase()))
                .or_else(|| named(inner, "attributes.queryParams['").map(|n| Self::Query(n.to_owned()))),
        }
    }

    /// Parses `text` where only the forms `allowed` accepts make sense; else
    /// the configuration error `refusal` words.
    pub fn parse_for(
        text: &str,
        allowed: impl Fn(&Self) -> bool,
        refusal: impl FnOnce() -> String,
    ) -> Result<Self, PolicyError> {
        Self::parse(text)
            .filter(allowed)
            .ok_or_else(|| PolicyError::Config(refusal()))
    }

    /// Parses `text` of `field`, which must name a request header; the header's lowercase name.
    pub fn header(field: &str, text: &str) -> Result<String, PolicyError> {
        let refusal = || format!("{field} `{text}`: only #[attributes.headers['NAME']] is supported");
        match Self::parse_for(text, |e| matches!(e, Self::Header(_)), refusal)? {
            Self::Header(name) => Ok(name),
            _ => unreachable!("parse_for admitted only a header"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_supported_form_parses_and_others_do_not() {
        let cases = [
            (
                "#[attributes.headers['X-Client']]",
                Some(Expr::Header("x-client".into())),
            ),
            (
                " #[attributes.queryParams['key']] ",
                Some(Expr::Query("key".into())),
            ),
            ("#[attributes.remoteAddress]", Some(Expr::RemoteAddress)),
            ("#[attributes.requestPath]", Some(Expr::RequestPath)),
            ("#[attributes.method]", Some(Expr::Method)),
            ("#[authentication.clientId]", Some(Expr::ClientId)),
            ("#[attributes.headers['']]", None),
            ("#[attributes.headers['a']b']]", None),
            ("attributes.headers['x']", None),
            ("#[vars.claimSet.sub]", None),
        ];
        for (text, want) in cases {
            assert_eq!(Expr::parse(text), want, "{text}");
        }
        assert_eq!(
            Expr::header("ipExpression", "#[attributes.headers['X-Forwarded-For']]"),
            Ok("x-forwarded-for".into())
        );
        assert_eq!(
            Expr::header("ipExpression", "#[attributes.method]"),
            Err(PolicyError::Config(
                "ipExpression `#[attributes.method]`: only #[attributes.headers['NAME']] is supported".into()
            ))
        );
    }
}
