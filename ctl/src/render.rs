//! `kubectl wgmesh status` as text: one screen, tables aligned, findings last.

use crate::health::{Health, Severity};
use std::fmt::Write;

/// Meshes up to this many nodes show every pair; larger ones only the pairs that are not
/// fresh (`--pairs` shows all).
pub const PAIRS_SHOWN_UP_TO: usize = 8;

/// Columns padded to the widest cell.
fn table(out: &mut String, rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths[c] - cell.chars().count();
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}

fn or_dash(v: Option<impl ToString>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// Seconds as `45s`, `12m`, `3h`, `2d`.
pub fn age(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// The status screen. `all_pairs` lists every pair whatever the mesh's size.
pub fn status(h: &Health, all_pairs: bool) -> String {
    let mut out = String::new();
    let ready_nodes = h.nodes.iter().filter(|n| n.ready).count();
    let ready_ext = h.external_peers.iter().filter(|n| n.ready).count();
    let _ = writeln!(
        out,
        "Mesh {}: {} ({}); nodes {}/{} ready; external peers {}/{} ready",
        h.mesh.as_deref().unwrap_or("-"),
        if h.mesh_ready { "Ready" } else { "NOT READY" },
        h.mesh_reason,
        ready_nodes,
        h.nodes.len(),
        ready_ext,
        h.external_peers.len(),
    );
    out.push('\n');
    let mut rows = vec![
        [
            "NODE",
            "READY",
            "AGENT",
            "LOCATION",
            "NAT",
            "KEY",
            "ROTATION",
            "PEERS",
            "PATHS",
            "POD CIDRS",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for n in h.nodes.iter().chain(&h.external_peers) {
        let peers = match (n.peers_connected, n.peers_configured) {
            (Some(c), Some(t)) => format!("{c}/{t}"),
            _ => "-".into(),
        };
        rows.push(vec![
            n.name.clone(),
            if n.ready {
                "yes".into()
            } else {
                format!("no ({})", n.reason)
            },
            n.agent.clone(),
            or_dash(n.location.as_ref()),
            // NAT matters between locations only.
            or_dash(n.nat.as_ref().filter(|_| n.location.is_some())),
            n.key_generation.map_or("-".into(), |g| format!("gen {g}")),
            or_dash(n.rotation.as_ref()),
            peers,
            or_dash(n.path_summary.as_ref()),
            if n.pod_cidrs.is_empty() {
                "-".into()
            } else {
                n.pod_cidrs.join(",")
            },
        ]);
    }
    table(&mut out, &rows);

    let show_all = all_pairs || h.nodes.len() <= PAIRS_SHOWN_UP_TO;
    let shown: Vec<_> = h
        .pairs
        .iter()
        .filter(|p| show_all || p.state != "fresh")
        .collect();
    out.push('\n');
    if shown.is_empty() {
        let _ = writeln!(
            out,
            "Pairs: {} tunnels, every handshake fresh",
            h.pairs.len()
        );
    } else {
        let _ = writeln!(
            out,
            "Pairs ({} of {}{}):",
            shown.len(),
            h.pairs.len(),
            if show_all { "" } else { ", the ones not fresh" }
        );
        let mut rows = vec![
            ["FROM", "TO", "PATH", "HANDSHAKE", "STATE"]
                .map(String::from)
                .to_vec(),
        ];
        for p in shown {
            let path = match &p.via {
                Some(via) => format!("{} via {via}", p.path),
                None => p.path.clone(),
            };
            rows.push(vec![
                p.from.clone(),
                p.to.clone(),
                path,
                p.handshake_age
                    .map_or("never".into(), |a| format!("{} ago", age(a))),
                p.state.clone(),
            ]);
        }
        table(&mut out, &rows);
    }

    out.push('\n');
    if h.rotations.is_empty() {
        let _ = writeln!(out, "Key rotation: none in progress");
    } else {
        let _ = writeln!(out, "Key rotation:");
        for r in &h.rotations {
            let mut line = format!("  {}: {} (generation {})", r.node, r.phase, r.generation);
            if !r.waiting_for.is_empty() {
                let _ = write!(line, ", waiting for {}", r.waiting_for.join(", "));
            }
            if !r.laggards.is_empty() {
                let _ = write!(line, ", laggards {}", r.laggards.join(", "));
            }
            let _ = writeln!(out, "{line}");
        }
    }
    if h.plaintext.is_empty() {
        let _ = writeln!(out, "Plaintext: none (every tunnel is encrypted)");
    } else {
        let _ = writeln!(
            out,
            "Plaintext (host gateway, unencrypted): {}",
            h.plaintext.join(", ")
        );
    }

    if !h.pools.is_empty() {
        out.push('\n');
        let mut rows = vec![
            ["POOL", "CIDRS", "ALLOCATED", "FREE", "READY"]
                .map(String::from)
                .to_vec(),
        ];
        for p in &h.pools {
            rows.push(vec![
                p.name.clone(),
                p.cidrs.join(","),
                p.allocated.to_string(),
                p.free.to_string(),
                if p.ready { "yes" } else { "no" }.into(),
            ]);
        }
        table(&mut out, &rows);
    }

    out.push('\n');
    if h.findings.is_empty() {
        let _ = writeln!(out, "Healthy: no findings.");
    } else {
        let errors = h
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .count();
        let _ = writeln!(
            out,
            "{} problem(s), {} warning(s):",
            errors,
            h.findings.len() - errors
        );
        for f in &h.findings {
            let mark = match f.severity {
                Severity::Error => "ERROR",
                Severity::Warning => "WARN ",
            };
            let _ = writeln!(out, "  {mark} {}: {}", f.object, f.message);
            let _ = writeln!(out, "        → {}", f.hint);
        }
    }
    out
}
