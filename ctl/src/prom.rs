//! A reader of the Prometheus/OpenMetrics text format, enough for what wgmesh's components
//! serve: samples with labels, `# TYPE`/`# HELP`/`# EOF` lines skipped.

use std::collections::BTreeMap;

/// One sample: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the text; a line that is not a sample is an error naming it.
pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(sample(line).ok_or_else(|| format!("line {}: not a sample: {line}", i + 1))?);
    }
    Ok(out)
}

fn sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    if name.is_empty() || !name.chars().all(valid) {
        return None;
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        rest = labels_of(body, &mut labels)?;
    }
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Reads `key="value",…}` into `labels`; returns what follows the `}`.
fn labels_of<'a>(mut body: &'a str, labels: &mut BTreeMap<String, String>) -> Option<&'a str> {
    loop {
        body = body.trim_start_matches([',', ' ']);
        if let Some(rest) = body.strip_prefix('}') {
            return Some(rest);
        }
        let eq = body.find('=')?;
        let key = body[..eq].trim();
        let quoted = body[eq + 1..].strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = quoted.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (j, '"') => break j,
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.to_owned(), value);
        body = &quoted[end + 1..];
    }
}

/// The names of the metric families in `samples`, with the suffixes a histogram or a
/// counter adds (`_bucket`, `_sum`, `_count`, `_total`, `_created`) kept as they are.
pub fn names(samples: &[Sample]) -> std::collections::BTreeSet<String> {
    samples.iter().map(|s| s.name.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_with_and_without_labels() {
        let text = "# HELP a_b x\n# TYPE a_b gauge\na_b 3\nc_total{peer=\"node-2\",kind=\"x\\\"y\"} 4.5\nd{} 1e3\n# EOF\n";
        let s = parse(text).expect("parses");
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].name, "a_b");
        assert_eq!(s[0].value, 3.0);
        assert_eq!(s[1].labels.get("peer").map(String::as_str), Some("node-2"));
        assert_eq!(s[1].labels.get("kind").map(String::as_str), Some("x\"y"));
        assert_eq!(s[1].value, 4.5);
        assert_eq!(s[2].value, 1000.0);
    }

    #[test]
    fn junk_is_an_error_naming_the_line() {
        let e = parse("ok 1\nnot a sample at all\n").expect_err("junk");
        assert!(e.contains("line 2"), "{e}");
        assert!(parse("x{a=\"unterminated} 1\n").is_err());
    }
}

/// Every sample name the text can hold: the samples' own, and those its `# TYPE` lines
/// declare (a counter `x` has samples `x_total`; a histogram `x_bucket`, `x_sum`, `x_count`),
/// so a family with no labelled child yet still counts.
pub fn exported_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out: std::collections::BTreeSet<String> =
        parse(text).map(|s| names(&s)).unwrap_or_default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("#") || words.next() != Some("TYPE") {
            continue;
        }
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            "summary" => &["", "_sum", "_count", "_created"],
            _ => &[""],
        };
        for s in suffixes {
            out.insert(format!("{name}{s}"));
        }
    }
    out
}

/// The metric names a PromQL expression reads that start with `prefix`.
pub fn names_in_expr(expr: &str, prefix: &str) -> std::collections::BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| t.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod exported_tests {
    use super::*;

    #[test]
    fn declared_families_count_before_their_first_sample() {
        let text = "# TYPE a_errors counter\n# HELP a_errors x\n# TYPE a_pass histogram\na_up 1\n";
        let n = exported_names(text);
        for want in ["a_errors_total", "a_pass_bucket", "a_pass_count", "a_up"] {
            assert!(n.contains(want), "{want} in {n:?}");
        }
        assert!(!n.contains("a_errors"));
    }

    #[test]
    fn names_in_an_expression() {
        let n = names_in_expr(
            "sum by (pool) (wgmesh_operator_pool_free_subnets) / rate(wgmesh_agent_errors_total[5m]) > 0.1",
            "wgmesh_",
        );
        assert_eq!(
            n.into_iter().collect::<Vec<_>>(),
            vec![
                "wgmesh_agent_errors_total",
                "wgmesh_operator_pool_free_subnets"
            ]
        );
    }
}
