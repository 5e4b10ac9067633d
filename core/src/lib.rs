//! Pure wgmesh logic.
//!
//! Every control loop in wgmesh observes, plans, then applies. This crate is the *plan* step:
//! functions from observed state, passed in as plain values, to desired state, returned as plain
//! values. Nothing here does I/O: no Kubernetes client, no async runtime, no netlink, no
//! WireGuard device, no clock (the time is an argument, `now`). That keeps every decision
//! testable with tables and property tests, and lets the operator and the node agent share them.
//!
//! The crate does not depend on the API types either. Its inputs mirror the resources closely
//! (strings where people write strings, so that validation and its messages live here), and the
//! operator copies fields across.
//!
//! - [`ipam`]: `PodCIDRPool` validation, pod subnet allocation for nodes, grace periods for
//!   released subnets, pool usage.
//! - [`keys`]: WireGuard public keys: text form, refusing weak keys, duplicates.
//! - [`peers`]: `MeshPeer` admission: readiness, reasons and messages, approved allowed IPs and
//!   endpoints.
//! - [`selector`]: Kubernetes label selectors as data.
//! - [`net`]: address families and CIDR parsing shared by the above.
//! - [`topology`]: the node agent's plan: device peers, routes (fail closed), host-gw, MTU.
//! - [`duration`]: Go-style durations as the `Mesh` spells them.
//! - [`rotation`]: key rotation decisions: which nodes are due, what a rotating node does next.
//! - [`api_view`]: whether a view of the API server is current, and since when.
//!
//! Error and problem types implement `Display` with a complete sentence fit for a status
//! condition or an event; where one error wraps another, the inner one is part of that text
//! rather than exposed through `Error::source`, so a chain printer does not repeat it.
//!
//! Times are [`std::time::SystemTime`] values supplied by the caller; creation times decide
//! seniority (the older pool or peer keeps what two of them claim), names break ties.

pub mod api_view;
pub mod duration;
pub mod ipam;
pub mod keys;
pub mod net;
pub mod paths;
pub mod peers;
pub mod rotation;
pub mod selector;
pub mod topology;

pub use ipam::{
    AllocationFailure, AllocationPlan, AllocationRequest, Assignment, Claim, Conflict, GraceStatus,
    Held, Node, NodeAllocation, Occupant, Pool, PoolError, PoolSpec, PoolUsage, PoolValidation,
    PrefixLengths, Released, Source, claim_name, expire_released, plan_allocations, validate_pools,
};
pub use keys::{DuplicateKey, KeyClaim, KeyError, KeyUse, PublicKey, find_duplicate_keys};
pub use net::{Family, NetworkError, parse_network};
pub use peers::{
    Approved, EndpointError, ExternalPeer, NodePeer, PeerKind, PeerProblem, Reason, Verdict, admit,
    parse_endpoint,
};
pub use selector::{LabelSelector, LabelSelectorRequirement, Selector, SelectorError};
