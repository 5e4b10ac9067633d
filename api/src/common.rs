//! Types shared by the three kinds: conditions, per-family values, and schema helpers for
//! what a structural OpenAPI schema can check (CIDR, key, endpoint, duration patterns).
//!
//! Patterns here are a first line of defence with readable errors at `kubectl apply` time;
//! the exact semantics (host bits, overlaps, low-order keys) are checked by the operator,
//! which reports them as conditions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// A condition's status, as in Kubernetes' `metav1.Condition`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

/// One observation of an object's state, shaped like Kubernetes' `metav1.Condition` so
/// generic tooling (`kubectl wait --for=condition=Ready`) understands it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The condition type, CamelCase: `Ready`, `Allocated`, `KeyPublished`, ….
    #[serde(rename = "type")]
    #[schemars(length(min = 1, max = 316))]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: ConditionStatus,
    /// The `metadata.generation` the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,
    /// When `status` last changed.
    pub last_transition_time: Time,
    /// A CamelCase, machine-readable reason for the status.
    #[schemars(
        length(min = 1, max = 1024),
        pattern(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    )]
    pub reason: String,
    /// What a person should know, and do, about this condition.
    #[schemars(length(max = 32768))]
    pub message: String,
}

/// Schema for a `conditions` list: a list-map keyed by `type`, so that the operator and the
/// agent can each own their own entries under server-side apply.
pub fn conditions_schema(generator: &mut SchemaGenerator) -> Schema {
    let item = generator.subschema_for::<Condition>();
    json_schema!({
        "type": "array",
        "description": "Conditions, one per type. Each type is written by one component.",
        "items": item,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
    })
}

const IPV4_OCTET: &str = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])";

fn ipv4_re() -> String {
    format!(r"{o}(\.{o}){{3}}", o = IPV4_OCTET)
}

/// An IPv6 literal: hex groups and colons, optionally ending in a dotted quad. Loose on
/// purpose; the operator parses it exactly.
const IPV6_RE: &str = r"[0-9a-fA-F]{0,4}(:[0-9a-fA-F]{0,4}){1,7}(:(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3})?";

/// The pattern a CIDR string must match: `10.244.0.0/16` or `fd00:10:244::/56`.
pub fn cidr_pattern() -> String {
    format!(
        r"^({v4}/([0-9]|[12][0-9]|3[0-2])|{v6}/([0-9]|[1-9][0-9]|1[01][0-9]|12[0-8]))$",
        v4 = ipv4_re(),
        v6 = IPV6_RE
    )
}

/// The pattern an endpoint must match: `203.0.113.7:51820` or `[2001:db8::7]:51820`.
pub fn endpoint_pattern() -> String {
    format!(
        r"^({v4}|\[{v6}\]):([1-9][0-9]{{0,3}}|[1-5][0-9]{{4}}|6[0-4][0-9]{{3}}|65[0-4][0-9]{{2}}|655[0-2][0-9]|6553[0-5])$",
        v4 = ipv4_re(),
        v6 = IPV6_RE
    )
}

/// A WireGuard public key: standard base64 of 32 bytes. The last character before `=` can
/// only be one of 16 values because the encoding has 4 spare bits.
pub const KEY_PATTERN: &str = r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$";

/// A Go-style duration: `30s`, `15m`, `720h`, `1h30m`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

/// Schema for one CIDR string.
pub fn cidr_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "pattern": cidr_pattern(),
        "description": "An IP network in CIDR notation, e.g. 10.244.0.0/16 or fd00:10:244::/56.",
    })
}

/// Schema for a list of CIDR strings, each validated by [`cidr_pattern`].
pub fn cidr_list_schema(generator: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": cidr_schema(generator),
    })
}

/// Schema for a list of CIDR strings that must hold at least one.
pub fn nonempty_cidr_list_schema(generator: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "minItems": 1,
        "items": cidr_schema(generator),
    })
}

/// Schema for an optional WireGuard public key.
pub fn key_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "nullable": true,
        "pattern": KEY_PATTERN,
        "description": "A WireGuard public key: base64 of 32 bytes (44 characters ending in '=').",
    })
}

/// Schema for an optional endpoint `ip:port` / `[ipv6]:port`.
pub fn endpoint_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "nullable": true,
        "pattern": endpoint_pattern(),
        "description": "A UDP endpoint: 203.0.113.7:51820 or [2001:db8::7]:51820.",
    })
}

/// Schema for a list of endpoints.
pub fn endpoint_list_schema(generator: &mut SchemaGenerator) -> Schema {
    let mut item = endpoint_schema(generator);
    item.remove("nullable");
    json_schema!({
        "type": "array",
        "items": item,
    })
}

/// Schema for an optional Go-style duration string.
pub fn duration_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "nullable": true,
        "pattern": DURATION_PATTERN,
        "description": "A duration such as 30s, 15m or 720h.",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // The patterns are compiled by the API server, not here; these tests keep their
    // construction honest (balanced, anchored) so a typo shows up before the server does.
    #[test]
    fn patterns_are_anchored_and_balanced() {
        for p in [cidr_pattern(), endpoint_pattern(), KEY_PATTERN.to_string()] {
            assert!(p.starts_with('^') && p.ends_with('$'), "{p}");
            assert_eq!(p.matches('(').count(), p.matches(')').count(), "{p}");
            assert_eq!(p.matches('[').count(), p.matches(']').count(), "{p}");
        }
    }
}
