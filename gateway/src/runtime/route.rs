//! Routing: listener → host (exact, then wildcard, then any) → longest base
//! path → API instance; then, once its policies have admitted the request, the
//! API's first upstream route whose rules take it → a weighted destination.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::{Destination, Facts, RouteConfig, any_matches, segment_prefix};

/// The routes of one listener.
#[derive(Debug)]
pub struct Router {
    routes: Vec<Route>,
}

/// One API instance's route, with a turn counter per upstream route for its weighted split.
#[derive(Debug)]
pub struct Route {
    /// The route as configured.
    pub cfg: RouteConfig,
    turns: Box<[AtomicU64]>,
}

impl Route {
    /// Where a request with `facts` goes: the first upstream route whose rules
    /// take it, and that route's next destination by weight.
    pub fn destination(&self, facts: &Facts<'_>) -> Option<&Destination> {
        let (upstream, turns) = self
            .cfg
            .upstreams
            .iter()
            .zip(&self.turns)
            .find(|(u, _)| any_matches(&u.rules, facts))?;
        match &upstream.destinations[..] {
            [only] => Some(only),
            _ => Some(upstream.pick(turns.fetch_add(1, Ordering::Relaxed))),
        }
    }

    /// The part of `path` below the base path, always starting with `/`.
    pub fn api_path<'p>(&self, path: &'p str) -> &'p str {
        let rest = if self.cfg.base_path == "/" {
            path
        } else {
            path.get(self.cfg.base_path.len()..).unwrap_or("")
        };
        if rest.is_empty() { "/" } else { rest }
    }
}

/// How well a route's hosts match a request's host; lower is better.
fn host_rank(patterns: &[String], host: &str) -> Option<usize> {
    if patterns.is_empty() {
        return Some(usize::MAX);
    }
    patterns
        .iter()
        .filter_map(|p| {
            if let Some(suffix) = p.strip_prefix("*.") {
                let matches = host.len() > suffix.len() + 1
                    && host.ends_with(suffix)
                    && host.as_bytes()[host.len() - suffix.len() - 1] == b'.';
                // A longer wildcard suffix is more specific.
                matches.then(|| usize::MAX / 2 - suffix.len())
            } else {
                (p == host).then_some(0)
            }
        })
        .min()
}

/// Lowercases a `Host` value and strips its port.
pub fn normalize_host(host: &str) -> String {
    let host = if host.starts_with('[') {
        host.split_once(']')
            .map_or(host, |(h, _)| h)
            .trim_start_matches('[')
    } else {
        host.rsplit_once(':').map_or(host, |(h, p)| {
            if p.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

impl Router {
    /// A router over `routes`.
    pub fn new(routes: Vec<RouteConfig>) -> Self {
        let routes = routes
            .into_iter()
            .map(|cfg| Route {
                turns: cfg.upstreams.iter().map(|_| AtomicU64::new(0)).collect(),
                cfg,
            })
            .collect();
        Self { routes }
    }

    /// The route for `host` (already normalized) and `path`, if any.
    pub fn find(&self, host: &str, path: &str) -> Option<&Route> {
        self.routes
            .iter()
            .filter(|r| segment_prefix(&r.cfg.base_path, path))
            .filter_map(|r| host_rank(&r.cfg.hosts, host).map(|rank| (rank, r)))
            .min_by_key(|(rank, r)| (*rank, usize::MAX - r.cfg.base_path.len()))
            .map(|(_, r)| r)
    }
}

/// Rewrites a request target for the upstream: `base_path` is replaced by
/// the destination's path `to`.
pub fn upstream_target(base_path: &str, to: &str, target: &str) -> String {
    let target = if target.starts_with('/') {
        target
    } else {
        // absolute-form: keep path and query only
        target
            .splitn(4, '/')
            .nth(3)
            .map_or("/", |rest| &target[target.len() - rest.len() - 1..])
    };
    let rest = if base_path == "/" {
        target
    } else {
        target.get(base_path.len()..).unwrap_or("")
    };
    let rest = if rest.is_empty() || rest.starts_with('?') {
        format!("/{rest}")
    } else {
        rest.to_string()
    };
    if to == "/" {
        rest
    } else if rest == "/" {
        to.to_owned()
    } else if let Some(query) = rest.strip_prefix("/?") {
        format!("{to}?{query}")
    } else {
        format!("{to}{rest}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(api: &str, hosts: &[&str], base: &str) -> RouteConfig {
        RouteConfig {
            api: api.into(),
            hosts: hosts.iter().map(|h| (*h).to_string()).collect(),
            base_path: base.into(),
            upstreams: vec![crate::config::UpstreamRoute::to(0, "/")],
            max_body: 0,
            policies: Vec::new(),
            websocket: crate::config::WebSocketConfig::default(),
        }
    }

    #[test]
    fn exact_host_then_wildcard_then_any_then_longest_path() {
        let r = Router::new(vec![
            route("any-root", &[], "/"),
            route("any-orders", &[], "/orders"),
            route("wild", &["*.example.com"], "/"),
            route("exact", &["api.example.com"], "/v1"),
        ]);
        let api = |host: &str, path: &str| r.find(host, path).map(|r| r.cfg.api.clone());
        assert_eq!(api("api.example.com", "/v1/x").as_deref(), Some("exact"));
        assert_eq!(api("api.example.com", "/v2").as_deref(), Some("wild"));
        assert_eq!(api("b.example.com", "/orders").as_deref(), Some("wild"));
        assert_eq!(api("example.com", "/orders/1").as_deref(), Some("any-orders"));
        assert_eq!(api("other", "/ordersx").as_deref(), Some("any-root"));
        let strict = Router::new(vec![route("exact", &["a"], "/v1")]);
        assert!(strict.find("a", "/v2").is_none());
        assert!(strict.find("b", "/v1").is_none());
    }

    #[test]
    fn host_normalization() {
        assert_eq!(normalize_host("API.Example.com:8080"), "api.example.com");
        assert_eq!(normalize_host("[::1]:80"), "::1");
        assert_eq!(normalize_host("a.b."), "a.b");
    }

    #[test]
    fn upstream_targets() {
        assert_eq!(upstream_target("/orders", "/api", "/orders/1?x=2"), "/api/1?x=2");
        assert_eq!(upstream_target("/orders", "/api", "/orders"), "/api");
        assert_eq!(upstream_target("/orders", "/api", "/orders?x"), "/api?x");
        assert_eq!(upstream_target("/orders", "/", "/orders/1"), "/1");
        assert_eq!(upstream_target("/orders", "/", "/orders"), "/");
        assert_eq!(upstream_target("/", "/", "/a/b?c"), "/a/b?c");
        assert_eq!(upstream_target("/", "/", "http://h:1/a?b"), "/a?b");
    }

    #[test]
    fn first_matching_upstream_route_then_weighted_destination() {
        use crate::config::{Pattern, Rule, UpstreamRoute};
        let mut cfg = route("a", &[], "/shop");
        let mut canary = UpstreamRoute::to(1, "/v2");
        canary.destinations.push(Destination {
            service: 2,
            path: "/v3".into(),
            weight: 100,
        });
        canary.rules = vec![Rule {
            path: Some(Pattern::new("/cart(/.*)?").unwrap()),
            ..Rule::default()
        }];
        cfg.upstreams.insert(0, canary);
        let router = Router::new(vec![cfg]);
        let route = router.find("h", "/shop/cart/1").expect("route");
        assert_eq!(route.api_path("/shop/cart/1"), "/cart/1");
        assert_eq!(route.api_path("/shop"), "/");
        let head = crate::http::parse_request(
            b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
            &crate::http::HeadLimits::default(),
        )
        .unwrap();
        let facts = |path| Facts {
            head: &head,
            path,
            host: "h",
        };
        let picks: Vec<usize> = (0..4)
            .map(|_| route.destination(&facts("/cart/1")).unwrap().service)
            .collect();
        assert_eq!(picks.iter().filter(|&&s| s == 1).count(), 2, "{picks:?}");
        assert_eq!(
            route.destination(&facts("/other")).unwrap().service,
            0,
            "the catch-all"
        );
    }
}
