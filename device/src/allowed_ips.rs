//! Allowed-IP table: longest-prefix match from an address to a value (a peer), for IPv4 and IPv6.
//!
//! This is cryptokey routing's lookup structure and nothing else: it knows no peers, sockets or
//! sessions. Outgoing packets are routed by their destination; decrypted packets are accepted only
//! when their source maps back to the peer that sent them.
//!
//! Layout: one hash map per prefix length that is in use, probed from the longest length down.
//! A mesh uses a handful of distinct lengths (/32, /128, a pod CIDR or two), so a lookup is a few
//! masked hash probes and no allocation.

use ipnet::IpNet;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::net::IpAddr;

/// Longest-prefix-match table from IP prefixes to values.
#[derive(Debug, Clone)]
pub struct AllowedIps<T> {
    v4: PrefixMap<u32, T>,
    v6: PrefixMap<u128, T>,
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        Self {
            v4: PrefixMap::new(),
            v6: PrefixMap::new(),
        }
    }
}

impl<T: Clone + PartialEq> AllowedIps<T> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts `net` (host bits are masked off) for `value`, returning the previous owner.
    /// A prefix has one owner: inserting it for another value moves it, as in WireGuard.
    pub fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        match net.trunc() {
            IpNet::V4(n) => self.v4.insert(u32::from(n.addr()), n.prefix_len(), value),
            IpNet::V6(n) => self.v6.insert(u128::from(n.addr()), n.prefix_len(), value),
        }
    }

    /// Removes one prefix, returning its owner.
    pub fn remove(&mut self, net: IpNet) -> Option<T> {
        match net.trunc() {
            IpNet::V4(n) => self.v4.remove(u32::from(n.addr()), n.prefix_len()),
            IpNet::V6(n) => self.v6.remove(u128::from(n.addr()), n.prefix_len()),
        }
    }

    /// Removes every prefix owned by `value`.
    pub fn remove_value(&mut self, value: &T) {
        self.v4.retain(|v| v != value);
        self.v6.retain(|v| v != value);
    }

    /// The owner of the longest prefix containing `addr`.
    #[inline]
    pub fn lookup(&self, addr: IpAddr) -> Option<&T> {
        match addr {
            IpAddr::V4(a) => self.v4.lookup(u32::from(a)),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                // A v4-mapped address is routed as the IPv4 address it carries.
                Some(v4) => self.v4.lookup(u32::from(v4)),
                None => self.v6.lookup(u128::from(a)),
            },
        }
    }

    /// The prefixes owned by `value`, IPv4 first, each family longest prefix first.
    pub fn prefixes_of(&self, value: &T) -> Vec<IpNet> {
        let mut out = Vec::new();
        self.v4.for_each(|key, len, v| {
            if v == value {
                out.push(IpNet::V4(
                    ipnet::Ipv4Net::new(key.into(), len).expect("length comes from the table"),
                ));
            }
        });
        self.v6.for_each(|key, len, v| {
            if v == value {
                out.push(IpNet::V6(
                    ipnet::Ipv6Net::new(key.into(), len).expect("length comes from the table"),
                ));
            }
        });
        out
    }

    /// Every value's prefixes, from one walk of the table, each in the order of
    /// [`AllowedIps::prefixes_of`]. (A walk per value is quadratic: at 1,000 peers with two
    /// prefixes each, a device snapshot took tens of milliseconds under the table's lock.)
    pub fn prefixes_by_value(&self) -> HashMap<T, Vec<IpNet>>
    where
        T: Hash + Eq,
    {
        let mut out: HashMap<T, Vec<IpNet>> = HashMap::new();
        self.v4.for_each(|key, len, v| {
            out.entry(v.clone()).or_default().push(IpNet::V4(
                ipnet::Ipv4Net::new(key.into(), len).expect("length comes from the table"),
            ));
        });
        self.v6.for_each(|key, len, v| {
            out.entry(v.clone()).or_default().push(IpNet::V6(
                ipnet::Ipv6Net::new(key.into(), len).expect("length comes from the table"),
            ));
        });
        out
    }

    /// Number of prefixes in the table.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// Whether the table has no prefixes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An address-sized integer that can be masked to a prefix.
trait PrefixKey: Copy + Eq + Hash {
    const BITS: u8;
    fn mask(self, len: u8) -> Self;
}

impl PrefixKey for u32 {
    const BITS: u8 = 32;
    #[inline]
    fn mask(self, len: u8) -> Self {
        if len == 0 {
            0
        } else {
            self & (u32::MAX << (32 - len))
        }
    }
}

impl PrefixKey for u128 {
    const BITS: u8 = 128;
    #[inline]
    fn mask(self, len: u8) -> Self {
        if len == 0 {
            0
        } else {
            self & (u128::MAX << (128 - len))
        }
    }
}

/// One hash map per prefix length; `lens` lists the non-empty lengths, longest first.
#[derive(Debug, Clone)]
struct PrefixMap<K, T> {
    by_len: Vec<HashMap<K, T, BuildHasherDefault<AddrHasher>>>,
    lens: Vec<u8>,
}

impl<K: PrefixKey, T> PrefixMap<K, T> {
    fn new() -> Self {
        Self {
            by_len: (0..=K::BITS).map(|_| HashMap::default()).collect(),
            lens: Vec::new(),
        }
    }

    fn insert(&mut self, key: K, len: u8, value: T) -> Option<T> {
        let len = len.min(K::BITS);
        let prev = self.by_len[usize::from(len)].insert(key.mask(len), value);
        if !self.lens.contains(&len) {
            self.lens.push(len);
            self.lens.sort_unstable_by(|a, b| b.cmp(a));
        }
        prev
    }

    fn remove(&mut self, key: K, len: u8) -> Option<T> {
        let len = len.min(K::BITS);
        let prev = self.by_len[usize::from(len)].remove(&key.mask(len));
        self.refresh_lens();
        prev
    }

    fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        for map in &mut self.by_len {
            map.retain(|_, v| keep(v));
        }
        self.refresh_lens();
    }

    fn refresh_lens(&mut self) {
        let by_len = &self.by_len;
        self.lens.retain(|&l| !by_len[usize::from(l)].is_empty());
    }

    #[inline]
    fn lookup(&self, addr: K) -> Option<&T> {
        self.lens
            .iter()
            .find_map(|&len| self.by_len[usize::from(len)].get(&addr.mask(len)))
    }

    fn for_each(&self, mut f: impl FnMut(K, u8, &T)) {
        for &len in &self.lens {
            for (k, v) in &self.by_len[usize::from(len)] {
                f(*k, len, v);
            }
        }
    }

    fn len(&self) -> usize {
        self.by_len.iter().map(HashMap::len).sum()
    }
}

/// Multiplicative hasher for masked addresses. The table's keys are configured prefixes, not
/// attacker-chosen, so a keyed hash buys nothing here and costs on every packet.
#[derive(Debug, Default, Clone, Copy)]
struct AddrHasher(u64);

impl Hasher for AddrHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    #[inline]
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    #[inline]
    fn write_u128(&mut self, n: u128) {
        self.write_u64(n as u64);
        self.write_u64((n >> 64) as u64);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins_v4() {
        let mut t = AllowedIps::new();
        t.insert(net("10.0.0.0/8"), 1);
        t.insert(net("10.1.0.0/16"), 2);
        t.insert(net("10.1.2.3/32"), 3);
        assert_eq!(t.lookup(ip("10.9.9.9")), Some(&1));
        assert_eq!(t.lookup(ip("10.1.9.9")), Some(&2));
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(&3));
        assert_eq!(t.lookup(ip("11.0.0.1")), None);
        assert_eq!(t.lookup(ip("::1")), None);
    }

    #[test]
    fn longest_prefix_wins_v6() {
        let mut t = AllowedIps::new();
        t.insert(net("fd00::/8"), 1);
        t.insert(net("fd00:1::/32"), 2);
        t.insert(net("fd00:1::5/128"), 3);
        assert_eq!(t.lookup(ip("fd12::1")), Some(&1));
        assert_eq!(t.lookup(ip("fd00:1::6")), Some(&2));
        assert_eq!(t.lookup(ip("fd00:1::5")), Some(&3));
        assert_eq!(t.lookup(ip("fe80::1")), None);
        assert_eq!(t.lookup(ip("10.0.0.1")), None);
    }

    #[test]
    fn default_routes_catch_everything_in_their_family() {
        let mut t = AllowedIps::new();
        t.insert(net("0.0.0.0/0"), 1);
        t.insert(net("::/0"), 2);
        assert_eq!(t.lookup(ip("192.0.2.1")), Some(&1));
        assert_eq!(t.lookup(ip("2001:db8::1")), Some(&2));
        // v4-mapped v6 addresses route as IPv4.
        assert_eq!(t.lookup(ip("::ffff:192.0.2.1")), Some(&1));
    }

    #[test]
    fn host_bits_are_masked_and_a_prefix_has_one_owner() {
        let mut t = AllowedIps::new();
        assert_eq!(t.insert(net("10.0.0.7/24"), 1), None);
        assert_eq!(t.insert(net("10.0.0.0/24"), 2), Some(1));
        assert_eq!(t.lookup(ip("10.0.0.200")), Some(&2));
        assert_eq!(t.prefixes_of(&2), vec![net("10.0.0.0/24")]);
        assert!(t.prefixes_of(&1).is_empty());
        let all = t.prefixes_by_value();
        assert_eq!(all.get(&2), Some(&t.prefixes_of(&2)));
        assert!(!all.contains_key(&1));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn remove_value_drops_all_its_prefixes_and_falls_back_to_shorter() {
        let mut t = AllowedIps::new();
        t.insert(net("10.0.0.0/8"), 1);
        t.insert(net("10.1.0.0/16"), 2);
        t.insert(net("fd00::/64"), 2);
        t.remove_value(&2);
        assert_eq!(t.lookup(ip("10.1.0.1")), Some(&1));
        assert_eq!(t.lookup(ip("fd00::1")), None);
        assert_eq!(t.len(), 1);
        assert_eq!(t.remove(net("10.0.0.0/8")), Some(1));
        assert!(t.is_empty());
        assert_eq!(t.lookup(ip("10.1.0.1")), None);
    }

    #[test]
    fn lpm_matches_a_linear_scan() {
        // Deterministic pseudo-random prefixes and probes, checked against brute force.
        let mut seed = 0x1234_5678_9abc_def0_u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut t = AllowedIps::new();
        let mut list: Vec<(u32, u8, u32)> = Vec::new();
        for v in 0..200u32 {
            let len = (next() % 33) as u8;
            let addr = (next() as u32).mask(len);
            list.retain(|(a, l, _)| !(*a == addr && *l == len));
            list.push((addr, len, v));
            t.insert(IpNet::V4(ipnet::Ipv4Net::new(addr.into(), len).unwrap()), v);
        }
        for _ in 0..5000 {
            let probe = next() as u32;
            let want = list
                .iter()
                .filter(|(a, l, _)| probe.mask(*l) == *a)
                .max_by_key(|(_, l, _)| *l)
                .map(|(_, _, v)| v);
            assert_eq!(t.lookup(IpAddr::V4(probe.into())), want, "probe {probe:#x}");
        }
    }
}
