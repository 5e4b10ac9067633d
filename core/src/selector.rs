//! Kubernetes label selectors as plain data: which nodes a `PodCIDRPool` applies to.
//!
//! [`LabelSelector`] mirrors `metav1.LabelSelector` field for field (operators as strings), so
//! the operator copies the API object across without interpreting it. [`LabelSelector::compile`]
//! checks it the way the API server's `LabelSelectorAsSelector` does and yields a [`Selector`]
//! that can only match. This module must not look up nodes or read labels from anywhere: the
//! labels are an argument.
//!
//! Label key and value syntax is not checked here: node labels were validated by the API server,
//! and a selector naming a key no node can carry simply matches nothing (`In`) or everything
//! (`NotIn`, `DoesNotExist`), as in Kubernetes.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// A label selector as written in a resource (`metav1.LabelSelector`).
///
/// An empty selector selects every node. Requirements are ANDed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    /// `key: value` pairs that must all be present.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    /// Set-based requirements.
    #[serde(default)]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

/// One set-based requirement (`metav1.LabelSelectorRequirement`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelectorRequirement {
    /// The label key.
    pub key: String,
    /// `In`, `NotIn`, `Exists` or `DoesNotExist` (case-sensitive, as in Kubernetes).
    pub operator: String,
    /// The values for `In`/`NotIn` (non-empty); empty for `Exists`/`DoesNotExist`.
    #[serde(default)]
    pub values: Vec<String>,
}

/// Why a [`LabelSelector`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// The operator is not one of the four Kubernetes knows.
    #[error(
        "matchExpressions[{index}] (key {key:?}): unknown operator {operator:?}; \
         use In, NotIn, Exists or DoesNotExist"
    )]
    UnknownOperator {
        /// Position in `matchExpressions`.
        index: usize,
        /// The requirement's key.
        key: String,
        /// The operator as written.
        operator: String,
    },
    /// `In`/`NotIn` with no values.
    #[error("matchExpressions[{index}] (key {key:?}): {operator} needs at least one value")]
    MissingValues {
        /// Position in `matchExpressions`.
        index: usize,
        /// The requirement's key.
        key: String,
        /// `In` or `NotIn`.
        operator: String,
    },
    /// `Exists`/`DoesNotExist` with values.
    #[error("matchExpressions[{index}] (key {key:?}): {operator} takes no values, got {count}")]
    UnexpectedValues {
        /// Position in `matchExpressions`.
        index: usize,
        /// The requirement's key.
        key: String,
        /// `Exists` or `DoesNotExist`.
        operator: String,
        /// How many values were given.
        count: usize,
    },
    /// An empty key.
    #[error("matchExpressions[{index}]: the key is empty")]
    EmptyKey {
        /// Position in `matchExpressions`.
        index: usize,
    },
}

/// A checked selector. Built by [`LabelSelector::compile`] or [`Selector::everything`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

impl LabelSelector {
    /// Checks the selector and turns it into a [`Selector`].
    pub fn compile(&self) -> Result<Selector, SelectorError> {
        let mut requirements: Vec<Requirement> = self
            .match_labels
            .iter()
            .map(|(k, v)| Requirement::Equals(k.clone(), v.clone()))
            .collect();
        for (index, expr) in self.match_expressions.iter().enumerate() {
            if expr.key.is_empty() {
                return Err(SelectorError::EmptyKey { index });
            }
            let key = expr.key.clone();
            let values: BTreeSet<String> = expr.values.iter().cloned().collect();
            let needs_values = match expr.operator.as_str() {
                "In" | "NotIn" => true,
                "Exists" | "DoesNotExist" => false,
                _ => {
                    return Err(SelectorError::UnknownOperator {
                        index,
                        key,
                        operator: expr.operator.clone(),
                    });
                }
            };
            if needs_values && values.is_empty() {
                return Err(SelectorError::MissingValues {
                    index,
                    key,
                    operator: expr.operator.clone(),
                });
            }
            if !needs_values && !expr.values.is_empty() {
                return Err(SelectorError::UnexpectedValues {
                    index,
                    key,
                    operator: expr.operator.clone(),
                    count: expr.values.len(),
                });
            }
            requirements.push(match expr.operator.as_str() {
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" => Requirement::Exists(key),
                _ => Requirement::DoesNotExist(key),
            });
        }
        Ok(Selector { requirements })
    }
}

impl Selector {
    /// The selector that matches every node (an absent or empty `nodeSelector`).
    pub fn everything() -> Selector {
        Selector::default()
    }

    /// Whether this selector has no requirements and so matches every node.
    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether a node with these labels is selected.
    ///
    /// Kubernetes semantics: `NotIn` and `DoesNotExist` match a node without the key.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn expr(key: &str, operator: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: operator.into(),
            values: values.iter().map(|v| (*v).to_owned()).collect(),
        }
    }

    fn selector(match_labels: &[(&str, &str)], exprs: Vec<LabelSelectorRequirement>) -> Selector {
        LabelSelector {
            match_labels: labels(match_labels),
            match_expressions: exprs,
        }
        .compile()
        .expect("test selector is valid")
    }

    #[test]
    fn matching_follows_kubernetes_semantics() {
        let zone_a = labels(&[("zone", "a"), ("gpu", "true")]);
        let zone_b = labels(&[("zone", "b")]);
        let bare = labels(&[]);
        // (selector, matches zone_a, matches zone_b, matches bare)
        let table = [
            (Selector::everything(), true, true, true),
            (selector(&[], vec![]), true, true, true),
            (selector(&[("zone", "a")], vec![]), true, false, false),
            (
                selector(&[("zone", "a"), ("gpu", "true")], vec![]),
                true,
                false,
                false,
            ),
            (
                selector(&[], vec![expr("zone", "In", &["a", "c"])]),
                true,
                false,
                false,
            ),
            (
                selector(&[], vec![expr("zone", "NotIn", &["a"])]),
                false,
                true,
                true,
            ),
            (
                selector(&[], vec![expr("gpu", "Exists", &[])]),
                true,
                false,
                false,
            ),
            (
                selector(&[], vec![expr("gpu", "DoesNotExist", &[])]),
                false,
                true,
                true,
            ),
            (
                selector(&[("zone", "b")], vec![expr("gpu", "DoesNotExist", &[])]),
                false,
                true,
                false,
            ),
        ];
        for (i, (sel, a, b, none)) in table.iter().enumerate() {
            assert_eq!(sel.matches(&zone_a), *a, "row {i} zone_a");
            assert_eq!(sel.matches(&zone_b), *b, "row {i} zone_b");
            assert_eq!(sel.matches(&bare), *none, "row {i} bare");
        }
    }

    #[test]
    fn invalid_selectors_are_refused_like_the_api_server_does() {
        let compile = |e: LabelSelectorRequirement| {
            LabelSelector {
                match_labels: BTreeMap::new(),
                match_expressions: vec![e],
            }
            .compile()
        };
        assert!(matches!(
            compile(expr("zone", "in", &["a"])),
            Err(SelectorError::UnknownOperator { .. })
        ));
        assert!(matches!(
            compile(expr("zone", "In", &[])),
            Err(SelectorError::MissingValues { .. })
        ));
        assert!(matches!(
            compile(expr("zone", "NotIn", &[])),
            Err(SelectorError::MissingValues { .. })
        ));
        assert!(matches!(
            compile(expr("zone", "Exists", &["a"])),
            Err(SelectorError::UnexpectedValues { count: 1, .. })
        ));
        assert!(matches!(
            compile(expr("", "Exists", &[])),
            Err(SelectorError::EmptyKey { index: 0 })
        ));
    }
}
