//! `docs/configuration.md` cannot drift from the types: every field serde
//! accepts is documented in its section, and every documented field exists.

use std::fmt;

use portcullis::config::raw;
use serde::de::{self, Deserialize, Visitor};

/// Records the field list serde asks for, then stops.
struct Recorder<'a>(&'a mut Vec<&'static str>);

#[derive(Debug)]
struct Stop;

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("stop")
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Stop
    }
}

impl<'de> de::Deserializer<'de> for Recorder<'_> {
    type Error = Stop;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        Err(Stop)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Stop> {
        self.0.extend_from_slice(fields);
        Err(Stop)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map enum identifier ignored_any
    }
}

fn fields<T: for<'de> Deserialize<'de>>() -> Vec<&'static str> {
    let mut out = Vec::new();
    let _ = T::deserialize(Recorder(&mut out));
    assert!(!out.is_empty(), "{} has no fields", std::any::type_name::<T>());
    out
}

fn sections() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        ("Every resource", fields::<raw::Typed<serde::de::IgnoredAny>>()),
        ("metadata", fields::<raw::Metadata>()),
        ("ApiInstance.spec", fields::<raw::ApiInstanceSpec>()),
        ("ApiInstance.spec.policies[]", fields::<raw::InlinePolicy>()),
        ("ApiInstance.spec.services.NAME", fields::<raw::InlineService>()),
        (
            "ApiInstance.spec.services.NAME.routes[]",
            fields::<raw::ServiceRoute>(),
        ),
        (
            "ApiInstance.spec.services.NAME.routes[].config",
            fields::<raw::RouteConfig>(),
        ),
        ("ApiInstance.spec.limits", fields::<raw::ApiLimits>()),
        ("Service.spec", fields::<raw::ServiceSpec>()),
        ("Service.spec.timeouts", fields::<raw::ServiceTimeouts>()),
        ("Service.spec.healthCheck", fields::<raw::HealthCheckSpec>()),
        (
            "Service.spec.outlierDetection",
            fields::<raw::OutlierDetectionSpec>(),
        ),
        ("Service.spec.circuitBreaker", fields::<raw::CircuitBreakerSpec>()),
        ("PolicyBinding.spec", fields::<raw::PolicyBindingSpec>()),
        ("PolicyBinding.spec.targetRef", fields::<raw::TargetRef>()),
        ("PolicyBinding.spec.policyRef", fields::<raw::PolicyRef>()),
        ("Routes and several upstreams", fields::<raw::RuleSpec>()),
        ("route config", fields::<raw::RoutePolicyConfig>()),
        ("route-weighted config", fields::<raw::WeightedRouteConfig>()),
        (
            "route-weighted config.routes[]",
            fields::<raw::WeightedDestination>(),
        ),
        ("destinationRef", fields::<raw::DestinationRef>()),
        ("tls config", fields::<raw::InboundTlsConfig>()),
        ("tls-outbound config", fields::<raw::OutboundTlsConfig>()),
        ("certificate", fields::<raw::CertificateRef>()),
        ("Secret fields", fields::<raw::InlineSecret>()),
        ("Contract.spec", fields::<raw::ContractSpec>()),
        ("Registration.spec", fields::<raw::RegistrationSpec>()),
        ("Configuration.spec", fields::<raw::ConfigurationSpec>()),
        ("Configuration.spec.logging", fields::<raw::LoggingSpec>()),
        (
            "Configuration.spec.logging.runtimeLogs",
            fields::<raw::RuntimeLogsSpec>(),
        ),
        (
            "Configuration.spec.logging.accessLogs",
            fields::<raw::AccessLogOutputs>(),
        ),
        (
            "Configuration.spec.logging.outputs[]",
            fields::<raw::LogOutputSpec>(),
        ),
        ("Configuration.spec.tracing", fields::<raw::TracingSpec>()),
        (
            "Configuration.spec.tracing.provider",
            fields::<raw::TracingProviderSpec>(),
        ),
        (
            "Configuration.spec.tracing.provider.properties",
            fields::<raw::TracingPropertiesSpec>(),
        ),
        (
            "Configuration.spec.tracing.sampling",
            fields::<raw::TracingSamplingSpec>(),
        ),
        (
            "Configuration.spec.tracing.labels[]",
            fields::<raw::TracingLabelSpec>(),
        ),
        ("file parameters", fields::<raw::FileOutputParams>()),
        ("stdout parameters", fields::<raw::StdoutOutputParams>()),
        ("syslog parameters", fields::<raw::SyslogOutputParams>()),
        (
            "Configuration.spec.sharedStorage",
            fields::<raw::SharedStorageSpec>(),
        ),
        (
            "Configuration.spec.sharedStorage.redis",
            fields::<raw::RedisSpec>(),
        ),
        (
            "Configuration.spec.sharedStorage.redis.tls",
            fields::<raw::RedisTlsSpec>(),
        ),
        ("Configuration.spec.gatekeeper", fields::<raw::GatekeeperSpec>()),
        ("Configuration.spec.secrets", fields::<raw::SecretsSpec>()),
        ("Configuration.spec.proxy", fields::<raw::ProxySpec>()),
        ("Configuration.spec.proxy.limits", fields::<raw::LimitsSpec>()),
        ("Configuration.spec.proxy.timeouts", fields::<raw::TimeoutsSpec>()),
        (
            "Configuration.spec.proxy.forwarded",
            fields::<raw::ForwardedSpec>(),
        ),
    ]
}

/// The table rows' field names under `### {title}`, up to the next heading.
fn documented<'a>(doc: &'a str, title: &str) -> Option<Vec<&'a str>> {
    let heading = format!("### {title}\n");
    let start = doc.find(&heading)? + heading.len();
    let rest = &doc[start..];
    let end = rest.find("\n#").map_or(rest.len(), |i| i + 1);
    Some(
        rest[..end]
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split_once('`').map(|(name, _)| name))
            .collect(),
    )
}

#[test]
fn the_configuration_reference_matches_the_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/configuration.md");
    let doc = std::fs::read_to_string(path).expect("docs/configuration.md");
    let mut problems = Vec::new();
    for (title, fields) in sections() {
        let Some(rows) = documented(&doc, title) else {
            problems.push(format!("no `### {title}` section"));
            continue;
        };
        for field in &fields {
            if !rows.contains(field) {
                problems.push(format!("{title}: field `{field}` is not documented"));
            }
        }
        for row in &rows {
            if !fields.contains(row) {
                problems.push(format!("{title}: documented field `{row}` does not exist"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "docs/configuration.md has drifted:\n{}",
        problems.join("\n")
    );
}
