//! `cors`: answers preflight requests itself and adds the CORS headers to responses.

use serde::Deserialize;

use super::{Denial, HeaderEdits, Policy, PolicyError, RequestView, Response, Verdict, parse};
use crate::http::Head;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AllowedMethod {
    method_name: String,
    #[serde(default = "super::yes")]
    is_allowed: bool,
}

fn thirty() -> u32 {
    30
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[expect(
    clippy::struct_field_names,
    reason = "the field is named so in the source gateway's configuration"
)]
struct OriginGroup {
    #[serde(default)]
    origin_group_name: Option<String>,
    #[serde(default)]
    origins: Vec<String>,
    #[serde(default = "thirty")]
    access_control_max_age: u32,
    #[serde(default)]
    allowed_methods: Vec<AllowedMethod>,
    #[serde(default)]
    headers: Vec<String>,
    #[serde(default)]
    exposed_headers: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Config {
    #[serde(default)]
    origin_groups: Vec<OriginGroup>,
    #[serde(default = "super::yes")]
    public_resource: bool,
    #[serde(default)]
    support_credentials: bool,
}

const ALL_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

#[derive(Debug)]
struct Group {
    origins: Vec<String>,
    max_age: u32,
    methods: Option<Vec<String>>,
    headers: Vec<String>,
    exposed: Vec<String>,
}

/// Cross-origin resource sharing for browsers.
#[derive(Debug)]
pub struct Cors {
    public: bool,
    credentials: bool,
    groups: Vec<Group>,
}

impl Cors {
    pub(super) fn from_config(config: serde_yaml_ng::Value) -> Result<Self, PolicyError> {
        let c: Config = parse(config)?;
        if !c.public_resource && c.origin_groups.iter().all(|g| g.origins.is_empty()) {
            return Err(PolicyError::Config(
                "publicResource is false but no originGroups list an origin: every origin would be refused"
                    .into(),
            ));
        }
        let groups = c
            .origin_groups
            .into_iter()
            .map(|g| {
                let _ = g.origin_group_name;
                for o in &g.origins {
                    if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
                        return Err(PolicyError::Config(format!(
                            "origin `{o}` must be scheme://host[:port] or *"
                        )));
                    }
                }
                let methods = if g.allowed_methods.is_empty() {
                    None
                } else {
                    Some(
                        g.allowed_methods
                            .iter()
                            .filter(|m| m.is_allowed)
                            .map(|m| m.method_name.to_ascii_uppercase())
                            .collect(),
                    )
                };
                Ok(Group {
                    origins: g
                        .origins
                        .iter()
                        .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                        .collect(),
                    max_age: g.access_control_max_age,
                    methods,
                    headers: g.headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
                    exposed: g.exposed_headers,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            public: c.public_resource,
            credentials: c.support_credentials,
            groups,
        })
    }

    fn group(&self, origin: &str) -> Option<&Group> {
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        self.groups
            .iter()
            .find(|g| g.origins.iter().any(|o| o == "*" || *o == origin))
    }

    /// `Access-Control-Allow-Origin` for `origin`, or `None` if it is not allowed.
    fn allow_origin(&self, origin: &str) -> Option<String> {
        if self.group(origin).is_some() || self.public {
            Some(
                if self.public && !self.credentials && self.group(origin).is_none() {
                    "*".into()
                } else {
                    origin.to_string()
                },
            )
        } else {
            None
        }
    }
}

fn header<'a>(head: &'a Head, name: &str) -> Option<&'a str> {
    head.header(name).and_then(|v| std::str::from_utf8(v).ok())
}

impl Policy for Cors {
    fn on_request(&self, request: &mut RequestView<'_>) -> Verdict {
        let head = request.head;
        let (Some(origin), Some(method)) = (
            header(head, "origin"),
            header(head, "access-control-request-method"),
        ) else {
            return Verdict::Continue;
        };
        if head.method() != "OPTIONS" {
            return Verdict::Continue;
        }
        // A preflight: the gateway answers it; the upstream never sees it.
        let Some(allow) = self.allow_origin(origin) else {
            return Verdict::Deny(Denial::Forbidden("cors: origin not allowed"));
        };
        let group = self.group(origin);
        let method = method.trim().to_ascii_uppercase();
        if let Some(methods) = group.and_then(|g| g.methods.as_ref())
            && !methods.contains(&method)
        {
            return Verdict::Deny(Denial::Forbidden("cors: method not allowed"));
        }
        let requested = header(head, "access-control-request-headers")
            .unwrap_or("")
            .to_string();
        let allowed_headers = match group {
            Some(g) if !g.headers.is_empty() => {
                let asked: Vec<String> = requested
                    .split(',')
                    .map(|h| h.trim().to_ascii_lowercase())
                    .filter(|h| !h.is_empty())
                    .collect();
                if asked.iter().any(|h| !g.headers.contains(h)) {
                    return Verdict::Deny(Denial::Forbidden("cors: header not allowed"));
                }
                g.headers.join(", ")
            }
            _ => requested,
        };
        let methods = group
            .and_then(|g| g.methods.as_ref())
            .map_or(ALL_METHODS.to_string(), |m| m.join(", "));
        let mut headers = vec![
            ("access-control-allow-origin".to_string(), allow),
            ("access-control-allow-methods".to_string(), methods),
            (
                "access-control-max-age".to_string(),
                group.map_or(30, |g| g.max_age).to_string(),
            ),
            ("vary".to_string(), "Origin".to_string()),
        ];
        if !allowed_headers.is_empty() {
            headers.push(("access-control-allow-headers".to_string(), allowed_headers));
        }
        if self.credentials {
            headers.push(("access-control-allow-credentials".to_string(), "true".to_string()));
        }
        Verdict::Respond(Response {
            status: 200,
            headers,
            body: String::new(),
        })
    }

    fn on_response(&self, request: &RequestView<'_>, _response: &Head, edits: &mut HeaderEdits) {
        let Some(origin) = header(request.head, "origin") else {
            return;
        };
        let Some(allow) = self.allow_origin(origin) else {
            return;
        };
        for name in [
            "access-control-allow-origin",
            "access-control-allow-credentials",
            "access-control-expose-headers",
        ] {
            edits.remove.push(super::headers::NameMatch::Exact(name.into()));
        }
        edits.add.push(("access-control-allow-origin".into(), allow));
        edits.add.push(("vary".into(), "Origin".into()));
        if self.credentials {
            edits
                .add
                .push(("access-control-allow-credentials".into(), "true".into()));
        }
        if let Some(g) = self.group(origin).filter(|g| !g.exposed.is_empty()) {
            edits
                .add
                .push(("access-control-expose-headers".into(), g.exposed.join(", ")));
        }
    }
}
