//! `kubectl wgmesh graph`: the mesh as a picture. Nodes on a circle, grouped by location;
//! one edge per pair of nodes, coloured by its path and drawn by its handshake's age. SVG
//! for people, DOT for other tools (`dot -Tpng`). Pure: from a [`Health`].

use crate::health::{Health, NodeHealth, PairHealth};
use crate::render::age;
use std::collections::BTreeMap;
use std::fmt::Write;

/// One edge: a pair of nodes and what both ends say of their tunnel.
#[derive(Debug, Clone, PartialEq)]
pub struct Edge {
    pub a: String,
    pub b: String,
    /// The path; where the two ends disagree, the one further from direct.
    pub path: String,
    pub via: Option<String>,
    /// The younger of the two ends' handshake ages.
    pub handshake_age: Option<u64>,
    /// `fresh`, `stale`, `none` or `plaintext`, the worse of the two ends.
    pub state: String,
}

fn path_rank(path: &str) -> u8 {
    match path {
        "Direct" => 1,
        "NATTraversal" => 2,
        "Relay" => 3,
        "HostGateway" => 4,
        // Not reported yet: any end that knows wins.
        _ => 0,
    }
}

fn state_rank(state: &str) -> u8 {
    match state {
        "fresh" => 0,
        "none" => 1,
        "stale" => 2,
        _ => 3,
    }
}

/// The pairs folded into one edge per unordered pair, sorted.
pub fn edges(pairs: &[PairHealth]) -> Vec<Edge> {
    let mut by_pair: BTreeMap<(String, String), Edge> = BTreeMap::new();
    for p in pairs {
        let (a, b) = if p.from <= p.to {
            (p.from.clone(), p.to.clone())
        } else {
            (p.to.clone(), p.from.clone())
        };
        let edge = by_pair
            .entry((a.clone(), b.clone()))
            .or_insert_with(|| Edge {
                a,
                b,
                path: p.path.clone(),
                via: p.via.clone(),
                handshake_age: p.handshake_age,
                state: p.state.clone(),
            });
        if path_rank(&p.path) > path_rank(&edge.path) {
            edge.path.clone_from(&p.path);
            edge.via.clone_from(&p.via);
        }
        if state_rank(&p.state) > state_rank(&edge.state) {
            edge.state.clone_from(&p.state);
        }
        edge.handshake_age = match (edge.handshake_age, p.handshake_age) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        };
    }
    by_pair.into_values().collect()
}

/// The colour of a path.
pub fn path_colour(path: &str) -> &'static str {
    match path {
        "Direct" => "#2e7d32",
        "NATTraversal" => "#1565c0",
        "Relay" => "#ef6c00",
        // In the clear.
        "HostGateway" => "#c62828",
        _ => "#9e9e9e",
    }
}

/// The dash pattern of a handshake state: solid when fresh.
fn dash(state: &str) -> Option<&'static str> {
    match state {
        "fresh" | "plaintext" => None,
        "stale" => Some("8 5"),
        _ => Some("2 4"),
    }
}

fn healthy(n: &NodeHealth) -> bool {
    n.ready && matches!(n.agent.as_str(), "up" | "unknown")
}

fn location(n: &NodeHealth) -> &str {
    n.location.as_deref().unwrap_or("(no location)")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn edge_title(e: &Edge) -> String {
    let path = match &e.via {
        Some(v) => format!("{} via {v}", e.path),
        None => e.path.clone(),
    };
    let hs = e.handshake_age.map_or("no handshake".to_owned(), |a| {
        format!("handshake {} ago", age(a))
    });
    format!("{} — {}: {path}, {hs} ({})", e.a, e.b, e.state)
}

/// The nodes in drawing order: by location, then name.
fn ordered(h: &Health) -> Vec<&NodeHealth> {
    let mut nodes: Vec<&NodeHealth> = h.nodes.iter().collect();
    nodes.sort_by(|x, y| location(x).cmp(location(y)).then(x.name.cmp(&y.name)));
    nodes
}

/// The mesh in Graphviz DOT: a cluster per location.
pub fn dot(h: &Health) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "graph wgmesh {{");
    let _ = writeln!(
        out,
        "  graph [label=\"wgmesh {}\", overlap=false];",
        esc(h.mesh.as_deref().unwrap_or(""))
    );
    let _ = writeln!(
        out,
        "  node [shape=ellipse, style=filled, fontname=\"sans-serif\"];"
    );
    let mut by_loc: BTreeMap<&str, Vec<&NodeHealth>> = BTreeMap::new();
    for n in ordered(h) {
        by_loc.entry(location(n)).or_default().push(n);
    }
    for (i, (loc, nodes)) in by_loc.iter().enumerate() {
        let _ = writeln!(out, "  subgraph cluster_{i} {{");
        let _ = writeln!(out, "    label=\"{}\";", esc(loc));
        for n in nodes {
            let fill = if healthy(n) { "#c8e6c9" } else { "#ffcdd2" };
            let _ = writeln!(
                out,
                "    \"{}\" [fillcolor=\"{fill}\", tooltip=\"agent {}, {}\"];",
                esc(&n.name),
                esc(&n.agent),
                if n.ready { "Ready" } else { "not Ready" }
            );
        }
        let _ = writeln!(out, "  }}");
    }
    for e in edges(&h.pairs) {
        let style = match dash(&e.state) {
            None => "solid",
            Some("8 5") => "dashed",
            Some(_) => "dotted",
        };
        let label = match e.handshake_age {
            Some(a) => format!("{} {}", e.path, age(a)),
            None => e.path.clone(),
        };
        let _ = writeln!(
            out,
            "  \"{}\" -- \"{}\" [color=\"{}\", style={style}, label=\"{}\", tooltip=\"{}\"];",
            esc(&e.a),
            esc(&e.b),
            path_colour(&e.path),
            esc(&label),
            esc(&edge_title(&e))
        );
    }
    let _ = writeln!(out, "}}");
    out
}

/// The mesh in SVG: nodes on a circle, locations together, labelled; a legend.
pub fn svg(h: &Health) -> String {
    let nodes = ordered(h);
    let n = nodes.len().max(1);
    let locations: Vec<&str> = {
        let mut l: Vec<&str> = nodes.iter().map(|n| location(n)).collect();
        l.dedup();
        l
    };
    // A gap of one slot between locations.
    let slots = n + if locations.len() > 1 {
        locations.len()
    } else {
        0
    };
    let radius = (slots as f64 * 40.0 / std::f64::consts::TAU).max(140.0);
    let margin = 170.0;
    let size = 2.0 * (radius + margin);
    let centre = size / 2.0;
    let mut positions: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    let mut label_angles: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut slot = 0usize;
    let mut previous: Option<&str> = None;
    for node in &nodes {
        let loc = location(node);
        if locations.len() > 1 && previous.is_some_and(|p| p != loc) {
            slot += 1;
        }
        previous = Some(loc);
        let angle =
            slot as f64 / slots as f64 * std::f64::consts::TAU - std::f64::consts::FRAC_PI_2;
        positions.insert(
            node.name.as_str(),
            (centre + radius * angle.cos(), centre + radius * angle.sin()),
        );
        label_angles.entry(loc).or_default().push(angle);
        slot += 1;
    }

    let edges = edges(&h.pairs);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{size:.0}\" height=\"{:.0}\" viewBox=\"0 0 {size:.0} {:.0}\" font-family=\"sans-serif\" font-size=\"12\">",
        size + 40.0,
        size + 40.0
    );
    let _ = writeln!(
        out,
        "<title>wgmesh {}: {} nodes, {} tunnels</title>",
        esc(h.mesh.as_deref().unwrap_or("")),
        h.nodes.len(),
        edges.len()
    );
    let _ = writeln!(out, "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
    let _ = writeln!(out, "<g class=\"edges\">");
    for e in &edges {
        let (Some(&(x1, y1)), Some(&(x2, y2))) =
            (positions.get(e.a.as_str()), positions.get(e.b.as_str()))
        else {
            continue;
        };
        let dash = dash(&e.state)
            .map(|d| format!(" stroke-dasharray=\"{d}\""))
            .unwrap_or_default();
        let opacity = if e.state == "fresh" || e.state == "plaintext" {
            "0.9"
        } else {
            "0.5"
        };
        let _ = writeln!(
            out,
            "<line class=\"edge\" data-from=\"{}\" data-to=\"{}\" data-path=\"{}\" data-state=\"{}\" x1=\"{x1:.1}\" y1=\"{y1:.1}\" x2=\"{x2:.1}\" y2=\"{y2:.1}\" stroke=\"{}\" stroke-width=\"2\" stroke-opacity=\"{opacity}\"{dash}><title>{}</title></line>",
            esc(&e.a),
            esc(&e.b),
            esc(&e.path),
            esc(&e.state),
            path_colour(&e.path),
            esc(&edge_title(e))
        );
    }
    let _ = writeln!(out, "</g>");
    for loc in &locations {
        let angles = &label_angles[loc];
        let mid = angles.iter().sum::<f64>() / angles.len() as f64;
        let (x, y) = (
            centre + (radius + 95.0) * mid.cos(),
            centre + (radius + 95.0) * mid.sin(),
        );
        let _ = writeln!(out, "<g class=\"location\" data-location=\"{}\">", esc(loc));
        let _ = writeln!(
            out,
            "<text x=\"{x:.1}\" y=\"{y:.1}\" text-anchor=\"middle\" font-weight=\"bold\" fill=\"#455a64\">{}</text>",
            esc(loc)
        );
        for node in nodes.iter().filter(|n| location(n) == *loc) {
            let (x, y) = positions[node.name.as_str()];
            let (fill, stroke) = if healthy(node) {
                ("#c8e6c9", "#2e7d32")
            } else {
                ("#ffcdd2", "#c62828")
            };
            let angle = (y - centre).atan2(x - centre);
            let (lx, ly) = (x + 24.0 * angle.cos(), y + 24.0 * angle.sin() + 4.0);
            let anchor = if angle.cos() < -0.2 {
                "end"
            } else if angle.cos() > 0.2 {
                "start"
            } else {
                "middle"
            };
            let _ = writeln!(
                out,
                "<g class=\"node\" data-node=\"{}\" data-ready=\"{}\" data-agent=\"{}\"><circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"11\" fill=\"{fill}\" stroke=\"{stroke}\" stroke-width=\"2\"/><text x=\"{lx:.1}\" y=\"{ly:.1}\" text-anchor=\"{anchor}\">{}</text><title>{}: {}, agent {}</title></g>",
                esc(&node.name),
                node.ready,
                esc(&node.agent),
                esc(&node.name),
                esc(&node.name),
                if node.ready {
                    "Ready".to_owned()
                } else {
                    format!("not Ready ({})", node.reason)
                },
                esc(&node.agent)
            );
        }
        let _ = writeln!(out, "</g>");
    }
    // Legend.
    let mut y = size - 70.0;
    let _ = writeln!(out, "<g class=\"legend\">");
    for (label, colour, dash) in [
        ("Direct", path_colour("Direct"), ""),
        ("NAT traversal", path_colour("NATTraversal"), ""),
        ("Relay", path_colour("Relay"), ""),
        ("Host gateway (unencrypted)", path_colour("HostGateway"), ""),
        ("stale handshake", "#616161", " stroke-dasharray=\"8 5\""),
        ("no handshake", "#616161", " stroke-dasharray=\"2 4\""),
    ] {
        let _ = writeln!(
            out,
            "<line x1=\"10\" y1=\"{y:.0}\" x2=\"40\" y2=\"{y:.0}\" stroke=\"{colour}\" stroke-width=\"2\"{dash}/><text x=\"48\" y=\"{:.0}\">{label}</text>",
            y + 4.0
        );
        y += 16.0;
    }
    let _ = writeln!(out, "</g>");
    let _ = writeln!(out, "</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{AgentProbe, assess, tests::healthy_snapshot};

    #[test]
    fn both_ends_fold_into_one_edge_taking_the_worse() {
        let p = |from: &str, to: &str, path: &str, age: Option<u64>, state: &str| PairHealth {
            from: from.into(),
            to: to.into(),
            path: path.into(),
            via: None,
            handshake_age: age,
            state: state.into(),
        };
        let e = edges(&[
            p("b", "a", "Direct", Some(10), "fresh"),
            p("a", "b", "Relay", Some(400), "stale"),
            p("a", "c", "Direct", None, "none"),
        ]);
        assert_eq!(e.len(), 2);
        assert_eq!((e[0].a.as_str(), e[0].b.as_str()), ("a", "b"));
        assert_eq!(e[0].path, "Relay");
        assert_eq!(e[0].state, "stale");
        assert_eq!(e[0].handshake_age, Some(10));
        assert_eq!(e[1].handshake_age, None);
    }

    #[test]
    fn the_svg_is_xml_with_a_node_per_node_and_an_edge_per_pair() {
        let mut s = healthy_snapshot();
        s.agents
            .insert("node-3".into(), AgentProbe::Silent("gone".into()));
        let h = assess(&s);
        let text = svg(&h);
        let doc = roxmltree::Document::parse(&text).expect("well-formed SVG");
        let class = |c: &str| {
            doc.descendants()
                .filter(|n| n.attribute("class") == Some(c))
                .collect::<Vec<_>>()
        };
        let nodes = class("node");
        assert_eq!(nodes.len(), 3);
        let bad: Vec<_> = nodes
            .iter()
            .filter(|n| n.attribute("data-agent") == Some("silent"))
            .filter_map(|n| n.attribute("data-node"))
            .collect();
        assert_eq!(bad, vec!["node-3"]);
        let edges = class("edge");
        assert_eq!(edges.len(), 3);
        assert!(
            edges
                .iter()
                .all(|e| e.attribute("stroke") == Some(path_colour("Direct")))
        );
        let locations: Vec<_> = class("location")
            .iter()
            .filter_map(|n| n.attribute("data-location"))
            .collect();
        assert_eq!(locations, vec!["eu", "us"]);
    }

    #[test]
    fn the_dot_has_a_cluster_per_location_and_an_edge_per_pair() {
        let text = dot(&assess(&healthy_snapshot()));
        assert!(text.starts_with("graph wgmesh {"));
        assert_eq!(text.matches("subgraph cluster_").count(), 2);
        assert_eq!(text.matches(" -- ").count(), 3);
        assert!(text.contains("\"node-1\" -- \"node-2\" [color=\"#2e7d32\", style=solid"));
    }
}
