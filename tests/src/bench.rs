//! What the benchmarks measure besides time: the API server's requests by verb and resource
//! and its CPU (from its own `/metrics`), and a process's CPU and memory (from `/proc`).

use anyhow::{Context, Result};
use base64::Engine;
use std::collections::BTreeMap;

/// The value after `name` on a command line.
pub fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// A fresh WireGuard public key (of a key nobody keeps), base64.
pub fn public_key() -> String {
    let secret = x25519_dalek::StaticSecret::random_from_rng(rand_core::OsRng);
    let public = x25519_dalek::PublicKey::from(&secret);
    base64::engine::general_purpose::STANDARD.encode(public.as_bytes())
}

/// The API server's counters at one moment.
#[derive(Debug, Clone, Default)]
pub struct ApiServerCounters {
    /// `apiserver_request_total`, summed by (verb, resource or resource/subresource) over
    /// codes and scopes.
    pub requests: BTreeMap<(String, String), f64>,
    /// `process_cpu_seconds_total`.
    pub cpu_seconds: f64,
}

/// Reads the API server's `/metrics` (the client needs the right to; an admin's does).
pub async fn scrape_api_server(client: &kube::Client) -> Result<ApiServerCounters> {
    let request = http::Request::get("/metrics")
        .body(Vec::new())
        .context("building the /metrics request")?;
    let text = client
        .request_text(request)
        .await
        .context("reading the API server's /metrics")?;
    Ok(parse_api_server(&text))
}

fn label<'a>(labels: &'a str, name: &str) -> &'a str {
    labels
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| k.trim() == name)
        .map_or("", |(_, v)| v.trim().trim_matches('"'))
}

/// The samples of a Prometheus text exposition: (series with its labels, value).
pub fn samples(text: &str) -> impl Iterator<Item = (&str, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(series, v)| Some((series, v.parse::<f64>().ok()?)))
}

/// Parses the Prometheus text of the API server's `/metrics`.
pub fn parse_api_server(text: &str) -> ApiServerCounters {
    let mut out = ApiServerCounters::default();
    for (series, value) in samples(text) {
        if series == "process_cpu_seconds_total" {
            out.cpu_seconds = value;
        } else if let Some(labels) = series
            .strip_prefix("apiserver_request_total{")
            .and_then(|l| l.strip_suffix('}'))
        {
            let resource = match label(labels, "subresource") {
                "" => label(labels, "resource").to_owned(),
                sub => format!("{}/{sub}", label(labels, "resource")),
            };
            let key = (label(labels, "verb").to_owned(), resource);
            *out.requests.entry(key).or_default() += value;
        }
    }
    out
}

impl ApiServerCounters {
    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &ApiServerCounters) -> ApiServerCounters {
        ApiServerCounters {
            requests: self
                .requests
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v - earlier.requests.get(k).copied().unwrap_or(0.0),
                    )
                })
                .filter(|(_, v)| *v > 0.0)
                .collect(),
            cpu_seconds: self.cpu_seconds - earlier.cpu_seconds,
        }
    }

    /// Requests whose verb is one of `verbs`.
    pub fn count(&self, verbs: &[&str]) -> f64 {
        self.requests
            .iter()
            .filter(|((v, _), _)| verbs.contains(&v.as_str()))
            .map(|(_, n)| n)
            .sum()
    }

    /// The writes: every verb that changes an object.
    pub fn writes(&self) -> f64 {
        self.count(&["POST", "PUT", "PATCH", "DELETE", "APPLY"])
    }
}

/// Field `n` (as `proc(5)` numbers them, from 1) of `/proc/PID/stat`, in seconds when it
/// counts clock ticks.
fn stat_seconds(pid: u32, n: usize) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it are fixed.
    let rest = &stat[stat.rfind(')')? + 2..];
    let ticks: f64 = rest
        .split_whitespace()
        .nth(n.checked_sub(3)?)?
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks / hz as f64)
}

/// A process's CPU time so far (user and system), in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    Some(stat_seconds(pid, 14)? + stat_seconds(pid, 15)?)
}

/// When a process started, in seconds since boot.
pub fn started_since_boot(pid: u32) -> Option<f64> {
    stat_seconds(pid, 22)
}

/// A field of `/proc/PID/status` in KiB: `VmRSS`, `VmHWM`.
pub fn memory_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Prints the requests by verb and resource, most first, with their rate over `secs`.
pub fn print_requests(counters: &ApiServerCounters, secs: f64, indent: &str) {
    let mut rows: Vec<(&(String, String), &f64)> = counters.requests.iter().collect();
    rows.sort_by(|a, b| b.1.total_cmp(a.1));
    for ((verb, resource), n) in rows.into_iter().filter(|(_, n)| **n >= 1.0) {
        println!(
            "{indent}{verb:<7} {resource:<28} {n:>9.0}  {:>8.1}/s",
            n / secs.max(1e-9)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_summed_by_verb_and_resource() {
        let text = "# HELP x\n\
            apiserver_request_total{code=\"201\",component=\"apiserver\",group=\"\",resource=\"nodes\",scope=\"resource\",verb=\"POST\",version=\"v1\"} 10\n\
            apiserver_request_total{code=\"409\",component=\"apiserver\",group=\"\",resource=\"nodes\",scope=\"resource\",verb=\"POST\",version=\"v1\"} 2\n\
            apiserver_request_total{code=\"200\",resource=\"meshpeers\",subresource=\"status\",verb=\"PATCH\"} 3\n\
            process_cpu_seconds_total 12.5\n";
        let c = parse_api_server(text);
        assert_eq!(c.requests[&("POST".into(), "nodes".into())], 12.0);
        assert_eq!(
            c.requests[&("PATCH".into(), "meshpeers/status".into())],
            3.0
        );
        assert_eq!(c.cpu_seconds, 12.5);
        assert_eq!(c.writes(), 15.0);
        let later = parse_api_server(&text.replace("} 10", "} 15"));
        let d = later.since(&c);
        assert_eq!(d.writes(), 5.0);
        assert_eq!(d.cpu_seconds, 0.0);
    }

    #[test]
    fn this_process_has_cpu_and_memory() {
        let me = std::process::id();
        assert!(cpu_seconds(me).is_some());
        assert!(started_since_boot(me).is_some_and(|s| s > 0.0));
        assert!(memory_kib(me, "VmRSS").is_some_and(|k| k > 0));
        assert!(memory_kib(me, "VmHWM").is_some());
    }
}
