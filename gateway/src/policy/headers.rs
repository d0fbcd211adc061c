//! `header-injection` and `header-removal`: add or drop headers on the way in and out.

use serde::Deserialize;

use super::{HeaderEdits, Policy, PolicyError, RequestView, Verdict, parse};
use crate::http::Head;

/// A header name, or an anchored case-insensitive pattern such as `Access-Control.*`.
#[derive(Debug, Clone)]
pub enum NameMatch {
    /// Exact name, lowercase.
    Exact(String),
    /// Pattern over the whole name.
    Pattern(regex::Regex),
}

impl NameMatch {
    fn parse(text: &str) -> Result<Self, PolicyError> {
        if text.bytes().all(is_tchar) {
            return Ok(Self::Exact(text.to_ascii_lowercase()));
        }
        regex::RegexBuilder::new(&format!("^(?:{text})$"))
            .case_insensitive(true)
            .build()
            .map(Self::Pattern)
            .map_err(|e| {
                PolicyError::Config(format!(
                    "`{text}` is neither a header name nor a valid pattern: {e}"
                ))
            })
    }

    /// Whether `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Exact(exact) => exact.eq_ignore_ascii_case(name),
            Self::Pattern(re) => re.is_match(name),
        }
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-^_`|~".contains(&b)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyValue {
    key: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct InjectionConfig {
    #[serde(default)]
    inbound_headers: Vec<KeyValue>,
    #[serde(default)]
    outbound_headers: Vec<KeyValue>,
}

fn header(kv: KeyValue, side: &str) -> Result<(String, String), PolicyError> {
    if kv.key.contains("#[") || kv.value.contains("#[") {
        return Err(PolicyError::Config(format!(
            "{side}: expressions (#[...]) are not supported; write literal names and values"
        )));
    }
    if kv.key.is_empty() || !kv.key.bytes().all(is_tchar) {
        return Err(PolicyError::Config(format!(
            "{side}: `{}` is not a valid header name",
            kv.key
        )));
    }
    if kv.value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
        return Err(PolicyError::Config(format!(
            "{side}: the value of `{}` holds a line break",
            kv.key
        )));
    }
    Ok((kv.key.to_ascii_lowercase(), kv.value))
}

/// Adds headers to requests (inbound) and responses (outbound).
#[derive(Debug)]
pub struct Injection {
    inbound: Vec<(String, String)>,
    outbound: Vec<(String, String)>,
}

impl Injection {
    pub(super) fn from_config(config: serde_yaml_ng::Value) -> Result<Self, PolicyError> {
        let c: InjectionConfig = parse(config)?;
        if c.inbound_headers.is_empty() && c.outbound_headers.is_empty() {
            return Err(PolicyError::Config(
                "inboundHeaders and outboundHeaders are both empty: nothing to inject".into(),
            ));
        }
        let inbound = c
            .inbound_headers
            .into_iter()
            .map(|kv| header(kv, "inboundHeaders"))
            .collect::<Result<_, _>>()?;
        let outbound = c
            .outbound_headers
            .into_iter()
            .map(|kv| header(kv, "outboundHeaders"))
            .collect::<Result<_, _>>()?;
        Ok(Self { inbound, outbound })
    }
}

/// Headers that carry framing or routing, which injection replaces rather than repeats.
const SINGLE: [&str; 4] = [
    "access-control-allow-origin",
    "content-type",
    "content-length",
    "transfer-encoding",
];

fn inject(pairs: &[(String, String)], edits: &mut HeaderEdits) {
    for (name, value) in pairs {
        if SINGLE.contains(&name.as_str()) {
            edits.remove.push(NameMatch::Exact(name.clone()));
        }
        edits.add.push((name.clone(), value.clone()));
    }
}

impl Policy for Injection {
    fn on_request(&self, request: &mut RequestView<'_>) -> Verdict {
        inject(&self.inbound, &mut request.edits);
        Verdict::Continue
    }

    fn on_response(&self, _request: &RequestView<'_>, _response: &Head, edits: &mut HeaderEdits) {
        inject(&self.outbound, edits);
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RemovalConfig {
    #[serde(default)]
    inbound_headers: Vec<String>,
    #[serde(default)]
    outbound_headers: Vec<String>,
}

/// Headers that cannot be removed: the exchange depends on them.
const PROTECTED: [&str; 7] = [
    "accept",
    "host",
    "content-type",
    "content-length",
    "date",
    "transfer-encoding",
    "connection",
];

/// Drops headers from requests (inbound) and responses (outbound).
#[derive(Debug)]
pub struct Removal {
    inbound: Vec<NameMatch>,
    outbound: Vec<NameMatch>,
}

impl Removal {
    pub(super) fn from_config(config: serde_yaml_ng::Value) -> Result<Self, PolicyError> {
        let c: RemovalConfig = parse(config)?;
        if c.inbound_headers.is_empty() && c.outbound_headers.is_empty() {
            return Err(PolicyError::Config(
                "inboundHeaders and outboundHeaders are both empty: nothing to remove".into(),
            ));
        }
        let names = |list: Vec<String>| -> Result<Vec<NameMatch>, PolicyError> {
            list.iter()
                .map(|n| {
                    if PROTECTED.iter().any(|p| p.eq_ignore_ascii_case(n)) {
                        return Err(PolicyError::Config(format!(
                            "`{n}` cannot be removed: the exchange depends on it"
                        )));
                    }
                    NameMatch::parse(n)
                })
                .collect()
        };
        Ok(Self {
            inbound: names(c.inbound_headers)?,
            outbound: names(c.outbound_headers)?,
        })
    }
}

impl Policy for Removal {
    fn on_request(&self, request: &mut RequestView<'_>) -> Verdict {
        request.edits.remove.extend(self.inbound.iter().cloned());
        Verdict::Continue
    }

    fn on_response(&self, _request: &RequestView<'_>, _response: &Head, edits: &mut HeaderEdits) {
        edits.remove.extend(self.outbound.iter().cloned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> serde_yaml_ng::Value {
        serde_yaml_ng::from_str(text).unwrap()
    }

    #[test]
    fn patterns_and_protected_names() {
        let r = Removal::from_config(yaml("inboundHeaders: [X-Debug, \"Access-Control.*\"]")).unwrap();
        assert!(r.inbound[0].matches("x-debug"));
        assert!(r.inbound[1].matches("access-control-allow-origin"));
        assert!(!r.inbound[1].matches("x-access-control"));
        assert!(Removal::from_config(yaml("inboundHeaders: [Host]")).is_err());
        assert!(Removal::from_config(yaml("{}")).is_err());
    }

    #[test]
    fn injection_refuses_expressions_and_line_breaks() {
        assert!(
            Injection::from_config(yaml(
                "inboundHeaders: [{key: a, value: \"#[attributes.requestPath]\"}]"
            ))
            .is_err()
        );
        assert!(Injection::from_config(yaml("inboundHeaders: [{key: a, value: \"x\\r\\ny: z\"}]")).is_err());
        assert!(Injection::from_config(yaml("inboundHeaders: [{key: \"bad name\", value: x}]")).is_err());
        assert!(
            Injection::from_config(yaml("outboundHeaders: [{key: X-Served-By, value: portcullis}]")).is_ok()
        );
    }
}
