//! Address arithmetic shared by [`crate::ipam`] and [`crate::peers`]: address families,
//! parsing CIDR networks written by people, and overlap tests.
//!
//! This module owns the rule for what a *network* is in wgmesh's resources: an address, a
//! slash and a prefix length, with every host bit zero (`10.244.0.0/16`, not `10.244.0.1/16`
//! and not `10.244.0.1`). It must not know about pools, peers or nodes, and must not allocate.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// An IP address family.
///
/// Ordered so that IPv4 sorts before IPv6, which is the order Kubernetes uses in
/// `spec.podCIDRs` and the order wgmesh writes subnets in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Family {
    /// IPv4: 32-bit addresses.
    #[serde(rename = "IPv4")]
    V4,
    /// IPv6: 128-bit addresses.
    #[serde(rename = "IPv6")]
    V6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// The family of a network.
    pub fn of(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }

    /// The family of an address.
    pub fn of_addr(addr: &IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The number of bits in an address of this family: 32 or 128.
    pub fn max_prefix_len(self) -> u8 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// Why a string is not a network wgmesh accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkError {
    /// Neither a network nor an address.
    #[error("{value:?} is not a CIDR network such as 10.244.0.0/16 or fd00:244::/48")]
    Unparseable {
        /// The text as given.
        value: String,
    },
    /// An address without `/prefix`. wgmesh does not guess `/32` or `/128`.
    #[error("{value:?} has no prefix length; write {suggestion} for this single address")]
    MissingPrefix {
        /// The text as given.
        value: String,
        /// The single-address network the author probably meant.
        suggestion: IpNet,
    },
    /// Host bits are set, e.g. `10.0.0.1/16`.
    #[error("{value:?} has host bits set; the network is {canonical}")]
    HostBitsSet {
        /// The text as given.
        value: String,
        /// The network with the host bits cleared.
        canonical: IpNet,
    },
}

/// Parses a network as written in a resource: `addr/len` with all host bits zero.
///
/// Letter case and IPv6 zero compression are normalised (`2001:DB8:0::/48` is accepted as
/// `2001:db8::/48`); anything else that is not the canonical network is refused with a
/// [`NetworkError`] that suggests the canonical form.
pub fn parse_network(value: &str) -> Result<IpNet, NetworkError> {
    match IpNet::from_str(value) {
        Ok(net) if net.trunc() == net => Ok(net),
        Ok(net) => Err(NetworkError::HostBitsSet {
            value: value.to_owned(),
            canonical: net.trunc(),
        }),
        Err(_) => match IpAddr::from_str(value) {
            Ok(addr) => Err(NetworkError::MissingPrefix {
                value: value.to_owned(),
                suggestion: IpNet::from(addr),
            }),
            Err(_) => Err(NetworkError::Unparseable {
                value: value.to_owned(),
            }),
        },
    }
}

/// Whether two networks share at least one address. Networks of different families never do.
///
/// CIDR networks either nest or are disjoint, so overlap is containment one way or the other.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

/// An inclusive range of addresses of one family, as integers.
///
/// IPv4 addresses use the low 32 bits. This is what the allocator walks: adding one to an
/// address is integer arithmetic, not string formatting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Span {
    pub(crate) family: Family,
    pub(crate) start: u128,
    pub(crate) end: u128,
}

impl Span {
    /// The addresses of a network (its host bits are ignored).
    pub(crate) fn of(net: &IpNet) -> Span {
        Span {
            family: Family::of(net),
            start: addr_bits(&net.network()),
            end: addr_bits(&net.broadcast()),
        }
    }
}

/// An address as an integer: IPv4 in the low 32 bits.
pub(crate) fn addr_bits(addr: &IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(*a)),
        IpAddr::V6(a) => u128::from(*a),
    }
}

/// The mask of the host bits of a `/prefix_len` network of `family`.
///
/// `prefix_len` must be at most the family's maximum; a `/0` IPv6 network has every bit set.
pub(crate) fn host_mask(family: Family, prefix_len: u8) -> u128 {
    let host_bits = u32::from(family.max_prefix_len().saturating_sub(prefix_len));
    if host_bits >= 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    }
}

/// The network of `family` that starts at `start` and has `prefix_len`.
///
/// `start` must fit the family (32 bits for IPv4) and `prefix_len` its maximum; both hold for
/// every caller, which only builds networks inside a pool's CIDRs. Out-of-range input is
/// clamped rather than panicking.
pub(crate) fn net_at(family: Family, start: u128, prefix_len: u8) -> IpNet {
    let addr = match family {
        Family::V4 => IpAddr::from(u32::try_from(start).unwrap_or(u32::MAX).to_be_bytes()),
        Family::V6 => IpAddr::from(start.to_be_bytes()),
    };
    let prefix_len = prefix_len.min(family.max_prefix_len());
    // Cannot fail: the prefix length was just clamped to the family's maximum.
    IpNet::new(addr, prefix_len)
        .map(|n| n.trunc())
        .unwrap_or_else(|_| IpNet::from(addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test network parses")
    }

    #[test]
    fn parse_network_accepts_canonical_networks() {
        for (input, want) in [
            ("10.0.0.0/16", "10.0.0.0/16"),
            ("10.0.0.7/32", "10.0.0.7/32"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("2001:DB8:0::/48", "2001:db8::/48"),
            ("fd00::1/128", "fd00::1/128"),
        ] {
            assert_eq!(parse_network(input), Ok(net(want)), "{input}");
        }
    }

    #[test]
    fn parse_network_refuses_with_a_suggestion() {
        assert_eq!(
            parse_network("10.0.0.1/16"),
            Err(NetworkError::HostBitsSet {
                value: "10.0.0.1/16".into(),
                canonical: net("10.0.0.0/16"),
            })
        );
        assert_eq!(
            parse_network("fd00::1"),
            Err(NetworkError::MissingPrefix {
                value: "fd00::1".into(),
                suggestion: net("fd00::1/128"),
            })
        );
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0/8",
            " 10.0.0.0/8",
            "banana",
            "::/129",
        ] {
            assert!(
                matches!(parse_network(bad), Err(NetworkError::Unparseable { .. })),
                "{bad:?} should be unparseable, got {:?}",
                parse_network(bad)
            );
        }
        let message = parse_network("10.0.0.1/16")
            .expect_err("host bits")
            .to_string();
        assert!(message.contains("10.0.0.0/16"), "{message}");
    }

    #[test]
    fn overlap_is_containment_either_way_and_never_across_families() {
        assert!(overlaps(&net("10.0.0.0/8"), &net("10.1.0.0/16")));
        assert!(overlaps(&net("10.1.0.0/16"), &net("10.0.0.0/8")));
        assert!(overlaps(&net("10.1.0.0/16"), &net("10.1.0.0/16")));
        assert!(!overlaps(&net("10.1.0.0/16"), &net("10.2.0.0/16")));
        assert!(!overlaps(&net("0.0.0.0/0"), &net("::/0")));
    }

    #[test]
    fn spans_and_masks_cover_the_edges_of_both_families() {
        assert_eq!(
            Span::of(&net("10.0.0.0/24")),
            Span {
                family: Family::V4,
                start: 0x0a00_0000,
                end: 0x0a00_00ff
            }
        );
        assert_eq!(Span::of(&net("::/0")).end, u128::MAX);
        assert_eq!(host_mask(Family::V4, 24), 0xff);
        assert_eq!(host_mask(Family::V4, 0), 0xffff_ffff);
        assert_eq!(host_mask(Family::V6, 0), u128::MAX);
        assert_eq!(host_mask(Family::V6, 128), 0);
        assert_eq!(net_at(Family::V4, 0x0a01_0200, 24), net("10.1.2.0/24"));
        assert_eq!(net_at(Family::V6, 0xfd00 << 112, 64), net("fd00::/64"));
    }
}
