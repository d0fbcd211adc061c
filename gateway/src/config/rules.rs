//! Request-matching rules, in the source gateway's shape: a route's or a
//! policy's `rules` list which requests it takes.
//!
//! A request matches a list when the list is empty or any one rule matches;
//! a rule matches when every field it sets matches. `path`, `methods`, `host`
//! and header values are regular expressions that must match the whole value
//! (`GET|POST`, `/users(/.*)?`); `pathPrefix` (a Portcullis extension) matches
//! whole path segments. Paths are matched below the ApiInstance's base path,
//! without the query string.

use crate::http::Head;

/// Largest compiled size of one rule's regular expression.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// A regular expression that must match a whole value; equal when its source is.
#[derive(Debug, Clone)]
pub struct Pattern {
    source: String,
    regex: regex::Regex,
}

impl Pattern {
    /// Compiles `source`, anchored at both ends; the message says what is wrong with it.
    pub fn new(source: &str) -> Result<Self, String> {
        regex::RegexBuilder::new(&format!("^(?:{source})$"))
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map(|regex| Self {
                source: source.to_string(),
                regex,
            })
            .map_err(|e| {
                format!(
                    "`{source}` is not a regular expression: {}",
                    last_line(&e.to_string())
                )
            })
    }

    /// Whether the whole of `value` matches.
    pub fn is_match(&self, value: &str) -> bool {
        self.regex.is_match(value)
    }

    /// The expression as written.
    pub fn source(&self) -> &str {
        &self.source
    }
}

fn last_line(text: &str) -> &str {
    text.lines().last().unwrap_or(text).trim()
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

/// One rule: a request matches when every field set here matches.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Rule {
    /// The path below the base path, as a whole-value regular expression.
    pub path: Option<Pattern>,
    /// A path prefix of whole segments (`/users` takes `/users` and `/users/1`, not `/usersx`).
    pub path_prefix: Option<String>,
    /// The method, as a whole-value regular expression (`GET|POST`).
    pub methods: Option<Pattern>,
    /// The host (lowercase, without port), as a whole-value regular expression.
    pub host: Option<Pattern>,
    /// Header names (lowercase) and a regular expression one of their values must match.
    pub headers: Vec<(String, Pattern)>,
}

/// What rules look at in one request.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The request head.
    pub head: &'a Head,
    /// Its path below the ApiInstance's base path, always starting with `/`.
    pub path: &'a str,
    /// Its host, lowercase and without port.
    pub host: &'a str,
}

impl Rule {
    /// Whether `facts` match every field of the rule.
    pub fn matches(&self, facts: &Facts<'_>) -> bool {
        self.path.as_ref().is_none_or(|p| p.is_match(facts.path))
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|prefix| segment_prefix(prefix, facts.path))
            && self
                .methods
                .as_ref()
                .is_none_or(|m| m.is_match(facts.head.method()))
            && self.host.as_ref().is_none_or(|h| h.is_match(facts.host))
            && self.headers.iter().all(|(name, pattern)| {
                facts
                    .head
                    .headers()
                    .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
                    .any(|(_, v)| std::str::from_utf8(v).is_ok_and(|v| pattern.is_match(v)))
            })
    }

    /// Whether the rule sets nothing, so it matches every request.
    pub fn is_catch_all(&self) -> bool {
        *self == Self::default()
    }
}

/// Whether `rules` take the request: no rules take every request, otherwise any one must match.
pub fn any_matches(rules: &[Rule], facts: &Facts<'_>) -> bool {
    rules.is_empty() || rules.iter().any(|r| r.matches(facts))
}

/// Whether `rules` take every request.
pub fn catches_all(rules: &[Rule]) -> bool {
    rules.is_empty() || rules.iter().any(Rule::is_catch_all)
}

/// Whether `prefix` is a prefix of `path` in whole segments (`/users` takes `/users/7`, not `/usersx`).
pub fn segment_prefix(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    prefix.is_empty()
        || path == prefix
        || (path.starts_with(prefix) && path.as_bytes().get(prefix.len()) == Some(&b'/'))
}

/// Where a route sends a share of its requests.
#[derive(Debug, Clone, PartialEq)]
pub struct Destination {
    /// Index into [`crate::config::Config::services`].
    pub service: usize,
    /// Path prefix the base path is replaced with upstream.
    pub path: String,
    /// Its share: `weight` out of the route's total.
    pub weight: u32,
}

/// One route of an ApiInstance: the requests its rules take go to its
/// destinations, split by weight. An ApiInstance's routes are tried in order.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamRoute {
    /// Which requests it takes (empty: all).
    pub rules: Vec<Rule>,
    /// Where they go; never empty.
    pub destinations: Vec<Destination>,
}

impl UpstreamRoute {
    /// A route taking every request to one service.
    pub fn to(service: usize, path: impl Into<String>) -> Self {
        Self {
            rules: Vec::new(),
            destinations: vec![Destination {
                service,
                path: path.into(),
                weight: 100,
            }],
        }
    }

    /// The sum of the destinations' weights.
    pub fn total_weight(&self) -> u32 {
        self.destinations.iter().map(|d| d.weight).sum()
    }

    /// The destination of the `turn`-th request this route takes: every run of
    /// `total_weight` turns gives each destination exactly its weight, spread
    /// through the run rather than in blocks.
    pub fn pick(&self, turn: u64) -> &Destination {
        let total = u64::from(self.total_weight().max(1));
        let mut slot = (turn % total) * stride(total) % total;
        for d in &self.destinations {
            let w = u64::from(d.weight);
            if slot < w {
                return d;
            }
            slot -= w;
        }
        &self.destinations[0]
    }
}

/// A step coprime with `total` near its golden section, so successive turns
/// land far apart in `0..total` and visit every slot once per `total` turns.
fn stride(total: u64) -> u64 {
    let mut s = (total * 618 / 1000).max(1);
    while gcd(s, total) != 1 {
        s += 1;
    }
    s
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::HeadLimits;

    fn head(raw: &str) -> Head {
        crate::http::parse_request(raw.as_bytes(), &HeadLimits::default()).expect("head")
    }

    fn facts<'a>(head: &'a Head, path: &'a str) -> Facts<'a> {
        Facts {
            head,
            path,
            host: "api.example.com",
        }
    }

    #[test]
    fn every_field_of_a_rule_must_match_and_any_rule_will_do() {
        let get = head("GET /users/7 HTTP/1.1\r\nHost: api.example.com\r\nX-Canary: yes\r\n\r\n");
        let post = head("POST /users/7 HTTP/1.1\r\nHost: api.example.com\r\n\r\n");
        let rule = Rule {
            path: Some(Pattern::new("/users(/.*)?").unwrap()),
            methods: Some(Pattern::new("GET|HEAD").unwrap()),
            host: Some(Pattern::new(r"api\.example\.com").unwrap()),
            headers: vec![("x-canary".into(), Pattern::new("yes|true").unwrap())],
            ..Rule::default()
        };
        assert!(rule.matches(&facts(&get, "/users/7")));
        assert!(!rule.matches(&facts(&post, "/users/7")), "method");
        assert!(
            !rule.matches(&facts(&get, "/usersx")),
            "the path regex is anchored"
        );
        let no_header = Rule {
            headers: vec![("x-missing".into(), Pattern::new(".*").unwrap())],
            ..Rule::default()
        };
        assert!(
            !no_header.matches(&facts(&get, "/")),
            "a header rule needs the header"
        );
        let prefix = Rule {
            path_prefix: Some("/users".into()),
            ..Rule::default()
        };
        assert!(prefix.matches(&facts(&get, "/users")));
        assert!(prefix.matches(&facts(&get, "/users/7")));
        assert!(!prefix.matches(&facts(&get, "/usersx")));
        assert!(any_matches(&[], &facts(&post, "/")));
        assert!(any_matches(
            &[no_header.clone(), prefix.clone()],
            &facts(&post, "/users/1")
        ));
        assert!(!any_matches(&[no_header, prefix], &facts(&post, "/orders")));
        assert!(
            Pattern::new("(")
                .unwrap_err()
                .contains("not a regular expression")
        );
    }

    #[test]
    fn weighted_picks_hold_their_shares_in_every_run_and_interleave() {
        for weights in [
            vec![70, 30],
            vec![1, 99],
            vec![50, 25, 25],
            vec![33, 33, 34],
            vec![100],
        ] {
            let route = UpstreamRoute {
                rules: Vec::new(),
                destinations: weights
                    .iter()
                    .enumerate()
                    .map(|(service, &weight)| Destination {
                        service,
                        path: "/".into(),
                        weight,
                    })
                    .collect(),
            };
            let total = u64::from(route.total_weight());
            let mut counts = vec![0u32; weights.len()];
            for turn in 5 * total..6 * total {
                counts[route.pick(turn).service] += 1;
            }
            assert_eq!(counts, weights, "one run of {total} turns");
        }
        let canary = UpstreamRoute {
            rules: Vec::new(),
            destinations: vec![
                Destination {
                    service: 0,
                    path: "/".into(),
                    weight: 50,
                },
                Destination {
                    service: 1,
                    path: "/".into(),
                    weight: 50,
                },
            ],
        };
        let first: Vec<usize> = (0..10).map(|t| canary.pick(t).service).collect();
        assert!(
            first.contains(&0) && first.contains(&1),
            "not in blocks: {first:?}"
        );
    }
}
