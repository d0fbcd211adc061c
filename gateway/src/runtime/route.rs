//! Routing: listener → host (exact, then wildcard, then any) → longest base path → API instance.

use crate::config::RouteConfig;

/// The routes of one listener.
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<RouteConfig>,
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

fn path_matches(base: &str, path: &str) -> bool {
    base == "/" || path == base || (path.starts_with(base) && path.as_bytes().get(base.len()) == Some(&b'/'))
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
        Self { routes }
    }

    /// The route for `host` (already normalized) and `path`, if any.
    pub fn find(&self, host: &str, path: &str) -> Option<&RouteConfig> {
        self.routes
            .iter()
            .filter(|r| path_matches(&r.base_path, path))
            .filter_map(|r| host_rank(&r.hosts, host).map(|rank| (rank, r)))
            .min_by_key(|(rank, r)| (*rank, usize::MAX - r.base_path.len()))
            .map(|(_, r)| r)
    }
}

/// Rewrites a request target for the upstream: the base path is replaced by the upstream path.
pub fn upstream_target(route: &RouteConfig, target: &str) -> String {
    let target = if target.starts_with('/') {
        target
    } else {
        // absolute-form: keep path and query only
        target
            .splitn(4, '/')
            .nth(3)
            .map_or("/", |rest| &target[target.len() - rest.len() - 1..])
    };
    let rest = if route.base_path == "/" {
        target
    } else {
        &target[route.base_path.len()..]
    };
    let rest = if rest.is_empty() || rest.starts_with('?') {
        format!("/{rest}")
    } else {
        rest.to_string()
    };
    if route.upstream_path == "/" {
        rest
    } else if rest == "/" {
        route.upstream_path.clone()
    } else if let Some(query) = rest.strip_prefix("/?") {
        format!("{}?{query}", route.upstream_path)
    } else {
        format!("{}{rest}", route.upstream_path)
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
            service: 0,
            upstream_path: "/".into(),
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
        let api = |host: &str, path: &str| r.find(host, path).map(|r| r.api.clone());
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
        let mut r = route("a", &[], "/orders");
        r.upstream_path = "/api".into();
        assert_eq!(upstream_target(&r, "/orders/1?x=2"), "/api/1?x=2");
        assert_eq!(upstream_target(&r, "/orders"), "/api");
        assert_eq!(upstream_target(&r, "/orders?x"), "/api?x");
        r.upstream_path = "/".into();
        assert_eq!(upstream_target(&r, "/orders/1"), "/1");
        assert_eq!(upstream_target(&r, "/orders"), "/");
        let root = route("r", &[], "/");
        assert_eq!(upstream_target(&root, "/a/b?c"), "/a/b?c");
        assert_eq!(upstream_target(&root, "http://h:1/a?b"), "/a?b");
    }
}
