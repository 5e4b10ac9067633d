//! The WireGuard cross-platform configuration protocol, as text: parsing `set=1` bodies into a
//! [`ConfigUpdate`] and rendering a [`DeviceSnapshot`] as a `get=1` answer.
//!
//! Pure: no sockets, no device. The answers and error codes follow wireguard-go, so `wg(8)` sees
//! no difference: `errno=0` on success, otherwise the negated errno (`-22` EINVAL for a bad key
//! or value, `-71` EPROTO for a line that is not `key=value`, `-98` EADDRINUSE for a port that
//! cannot be bound, `-90` EMSGSIZE for a `set=1` body over [`MAX_SET_BYTES`]).
//!
//! Memory is bounded by the input caps: a line is at most [`MAX_LINE_BYTES`] and a `set=1` body
//! at most [`MAX_SET_BYTES`], whatever it contains. The one answer that carries a private key
//! (`get=1`) is built in a zeroizing buffer that never reallocates.

use crate::config::{ConfigUpdate, DeviceSnapshot, Key, PeerUpdate, PrivateKey};
use ipnet::IpNet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::SystemTime;
use zeroize::Zeroizing;

/// Longest line accepted; real lines are under 100 bytes.
pub const MAX_LINE_BYTES: usize = 4096;

/// Largest `set=1` body, in bytes (with the newlines). `wg setconf` writes about 300 bytes per
/// peer (public and preshared key, endpoint, keepalive, protocol version) plus about 25 per
/// allowed IP: 4 MiB holds 10,000 peers with four allowed IPs each, several times the largest
/// mesh we plan for, while a client can make the device hold no more than that (the parsed
/// update is smaller than its text).
pub const MAX_SET_BYTES: usize = 4 << 20;

/// Why a UAPI operation failed, with its wire error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UapiError {
    /// A line that is not `key=value`, too long, or not UTF-8.
    #[error("malformed line: {0}")]
    Protocol(String),
    /// An unknown key or an invalid value.
    #[error("invalid {key}: {value:?}")]
    Invalid {
        /// The key of the offending line.
        key: String,
        /// Its value.
        value: String,
    },
    /// The listen port could not be bound.
    #[error("listen port cannot be bound: {0}")]
    PortInUse(String),
    /// Any other failure applying the configuration.
    #[error("device error: {0}")]
    Device(String),
    /// A `set=1` body longer than [`MAX_SET_BYTES`].
    #[error("set body longer than {0} bytes")]
    TooLarge(usize),
}

impl UapiError {
    /// The value of the `errno=` line: the negated errno, as wireguard-go writes it.
    pub fn errno(&self) -> i32 {
        -match self {
            UapiError::Protocol(_) => libc::EPROTO,
            UapiError::Invalid { .. } => libc::EINVAL,
            UapiError::PortInUse(_) => libc::EADDRINUSE,
            UapiError::Device(_) => libc::EIO,
            UapiError::TooLarge(_) => libc::EMSGSIZE,
        }
    }

    fn invalid(key: &str, value: &str) -> Self {
        UapiError::Invalid {
            key: truncate(key),
            value: truncate(value),
        }
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Incremental parser of a `set=1` body, fed one line (without its `\n`) at a time.
#[derive(Debug, Default)]
pub struct SetParser {
    update: ConfigUpdate,
    peer: Option<PeerUpdate>,
    /// Bytes of the body seen so far, newlines included.
    bytes: usize,
}

impl SetParser {
    /// A parser at the start of a body.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one line. Returns the finished update on the empty line that ends the body.
    /// Past [`MAX_SET_BYTES`] every line is refused with [`UapiError::TooLarge`].
    pub fn feed(&mut self, line: &str) -> Result<Option<ConfigUpdate>, UapiError> {
        self.skip(line)?;
        if line.is_empty() {
            return Ok(Some(self.finish()));
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(UapiError::Protocol(truncate(line)));
        };
        if key == "public_key" {
            self.flush_peer();
            self.peer = Some(PeerUpdate::new(parse_key(key, value)?));
            return Ok(None);
        }
        match self.peer.as_mut() {
            None => device_line(&mut self.update, key, value)?,
            Some(peer) => peer_line(peer, key, value)?,
        }
        Ok(None)
    }

    /// Counts a line of a body that is being skipped after an error (to keep the connection
    /// in step) against [`MAX_SET_BYTES`], without parsing it.
    pub fn skip(&mut self, line: &str) -> Result<(), UapiError> {
        self.bytes = self.bytes.saturating_add(line.len() + 1);
        if self.bytes > MAX_SET_BYTES {
            return Err(UapiError::TooLarge(MAX_SET_BYTES));
        }
        Ok(())
    }

    /// Bytes of the body seen so far, newlines included; never more than [`MAX_SET_BYTES`]
    /// plus one line.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The update parsed so far (for a body cut short by end of input, which wireguard-go also
    /// applies).
    pub fn finish(&mut self) -> ConfigUpdate {
        self.flush_peer();
        std::mem::take(&mut self.update)
    }

    fn flush_peer(&mut self) {
        if let Some(peer) = self.peer.take() {
            self.update.peers.push(peer);
        }
    }
}

fn device_line(update: &mut ConfigUpdate, key: &str, value: &str) -> Result<(), UapiError> {
    match key {
        "private_key" => {
            update.private_key = Some(PrivateKey::from_bytes(parse_key(key, value)?));
        }
        "listen_port" => update.listen_port = Some(parse_uint(key, value)?),
        "fwmark" => update.fwmark = Some(parse_uint(key, value)?),
        "replace_peers" => {
            parse_true(key, value)?;
            update.replace_peers = true;
            // Peers named before this line would be removed again: keep the order's meaning.
            update.peers.clear();
        }
        _ => return Err(UapiError::invalid(key, value)),
    }
    Ok(())
}

fn peer_line(peer: &mut PeerUpdate, key: &str, value: &str) -> Result<(), UapiError> {
    match key {
        "update_only" => {
            parse_true(key, value)?;
            peer.update_only = true;
        }
        "remove" => {
            parse_true(key, value)?;
            peer.remove = true;
        }
        "preshared_key" => peer.preshared_key = Some(parse_key(key, value)?),
        "endpoint" => {
            let addr: SocketAddr = value.parse().map_err(|_| UapiError::invalid(key, value))?;
            peer.endpoint = Some(unmap(addr));
        }
        "persistent_keepalive_interval" => {
            peer.persistent_keepalive = Some(parse_uint(key, value)?);
        }
        "replace_allowed_ips" => {
            parse_true(key, value)?;
            peer.replace_allowed_ips = true;
            peer.allowed_ips.clear();
        }
        "allowed_ip" => {
            let net: IpNet = value.parse().map_err(|_| UapiError::invalid(key, value))?;
            peer.allowed_ips.push(net.trunc());
        }
        "protocol_version" => {
            if value != "1" {
                return Err(UapiError::invalid(key, value));
            }
        }
        _ => return Err(UapiError::invalid(key, value)),
    }
    Ok(())
}

fn parse_true(key: &str, value: &str) -> Result<(), UapiError> {
    if value == "true" {
        Ok(())
    } else {
        Err(UapiError::invalid(key, value))
    }
}

/// Decimal without sign, like Go's `strconv.ParseUint`.
fn parse_uint<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, UapiError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(UapiError::invalid(key, value));
    }
    value.parse().map_err(|_| UapiError::invalid(key, value))
}

fn parse_key(key: &str, value: &str) -> Result<Key, UapiError> {
    decode_hex_key(value).ok_or_else(|| UapiError::invalid(key, value))
}

/// Decodes 64 hex digits (either case) into a key.
pub fn decode_hex_key(s: &str) -> Option<Key> {
    let bytes = s.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
    }
    Some(out)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Lowercase hex of a key.
pub fn encode_hex_key(key: &Key) -> String {
    let mut s = String::with_capacity(64);
    for b in key {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// An IPv4 address carried in an IPv6 socket address, shown as IPv4.
pub fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// Room for `private_key=<64 hex digits>\n`.
const PRIVATE_KEY_LINE_BYTES: usize = "private_key=\n".len() + 64;

/// Renders a `get=1` answer, including the closing `errno=0` and blank line. `private_key` is
/// the device's live key (a snapshot carries none); the answer is zeroized when dropped.
pub fn render_get(
    snapshot: &DeviceSnapshot,
    private_key: Option<&PrivateKey>,
) -> Zeroizing<String> {
    // The key line is written into a buffer of its exact size and the answer into one of its
    // exact size, so no copy of the key is left behind by a reallocation.
    let mut key_line = Zeroizing::new(String::with_capacity(PRIVATE_KEY_LINE_BYTES));
    if let Some(key) = private_key {
        key_line.push_str("private_key=");
        for b in key.as_bytes() {
            let _ = write!(key_line, "{b:02x}");
        }
        key_line.push('\n');
    }
    let rest = render_public(snapshot);
    let mut out = Zeroizing::new(String::with_capacity(key_line.len() + rest.len()));
    out.push_str(&key_line);
    out.push_str(&rest);
    out
}

/// Everything of a `get=1` answer but the private key.
fn render_public(snapshot: &DeviceSnapshot) -> String {
    let mut out = String::with_capacity(256 + snapshot.peers.len() * 320);
    if snapshot.listen_port != 0 {
        let _ = writeln!(out, "listen_port={}", snapshot.listen_port);
    }
    if snapshot.fwmark != 0 {
        let _ = writeln!(out, "fwmark={}", snapshot.fwmark);
    }
    for peer in &snapshot.peers {
        let _ = writeln!(out, "public_key={}", encode_hex_key(&peer.public_key));
        let _ = writeln!(
            out,
            "preshared_key={}",
            encode_hex_key(&peer.preshared_key.unwrap_or([0; 32]))
        );
        out.push_str("protocol_version=1\n");
        if let Some(endpoint) = peer.endpoint {
            let _ = writeln!(out, "endpoint={}", unmap(endpoint));
        }
        let (sec, nsec) = peer
            .last_handshake
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or((0, 0), |d| (d.as_secs(), d.subsec_nanos()));
        let _ = writeln!(out, "last_handshake_time_sec={sec}");
        let _ = writeln!(out, "last_handshake_time_nsec={nsec}");
        let _ = writeln!(out, "tx_bytes={}", peer.tx_bytes);
        let _ = writeln!(out, "rx_bytes={}", peer.rx_bytes);
        let _ = writeln!(
            out,
            "persistent_keepalive_interval={}",
            peer.persistent_keepalive
        );
        for net in &peer.allowed_ips {
            let _ = writeln!(out, "allowed_ip={net}");
        }
    }
    out.push_str("errno=0\n\n");
    out
}

/// The answer for a failed operation.
pub fn render_error(err: &UapiError) -> String {
    format!("errno={}\n\n", err.errno())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::{PeerSnapshot, SessionSnapshot};
    use std::time::Duration;

    const K1: &str = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";
    const K2: &str = "c4c8e984c5322c8184c72265b92b250fdb63688705f504ba003c88f03393cf28";
    const PSK: &str = "188515093e952f5f22e865cef3012e72f8b5f0b598ac0309d5dacce3b70fcf52";

    /// Parses a whole body ending with a blank line.
    fn parse(body: &str) -> Result<ConfigUpdate, UapiError> {
        let mut p = SetParser::new();
        for line in body.split('\n') {
            if let Some(done) = p.feed(line)? {
                return Ok(done);
            }
        }
        panic!("body without a terminating blank line");
    }

    #[test]
    fn parses_the_example_from_the_protocol_description() {
        let body = format!(
            "private_key={K1}\nfwmark=0\nlisten_port=12912\nreplace_peers=true\n\
             public_key={K2}\npreshared_key={PSK}\nreplace_allowed_ips=true\n\
             allowed_ip=192.168.4.4/32\nendpoint=[abcd:23::33%2]:51820\n\
             public_key={K1}\nreplace_allowed_ips=true\nallowed_ip=192.168.4.10/32\n\
             endpoint=182.122.22.19:3233\npersistent_keepalive_interval=111\n\
             allowed_ip=::/0\nprotocol_version=1\n\
             public_key={PSK}\nremove=true\n\n"
        );
        let u = parse(&body).unwrap();
        assert_eq!(
            u.private_key,
            decode_hex_key(K1).map(PrivateKey::from_bytes)
        );
        assert_eq!(u.fwmark, Some(0));
        assert_eq!(u.listen_port, Some(12912));
        assert!(u.replace_peers);
        assert_eq!(u.peers.len(), 3);
        let p0 = &u.peers[0];
        assert_eq!(p0.public_key, decode_hex_key(K2).unwrap());
        assert_eq!(p0.preshared_key, decode_hex_key(PSK));
        assert!(p0.replace_allowed_ips);
        assert_eq!(
            p0.allowed_ips,
            vec!["192.168.4.4/32".parse::<IpNet>().unwrap()]
        );
        assert_eq!(p0.endpoint.unwrap().port(), 51820);
        let p1 = &u.peers[1];
        assert_eq!(p1.endpoint, Some("182.122.22.19:3233".parse().unwrap()));
        assert_eq!(p1.persistent_keepalive, Some(111));
        assert_eq!(p1.allowed_ips.len(), 2);
        assert!(u.peers[2].remove);
    }

    #[test]
    fn allowed_ips_are_masked_and_endpoints_unmapped() {
        let u = parse(&format!(
            "public_key={K1}\nallowed_ip=10.1.2.3/24\nendpoint=[::ffff:10.0.0.1]:51820\n\n"
        ))
        .unwrap();
        assert_eq!(
            u.peers[0].allowed_ips,
            vec!["10.1.2.0/24".parse::<IpNet>().unwrap()]
        );
        assert_eq!(u.peers[0].endpoint, Some("10.0.0.1:51820".parse().unwrap()));
    }

    #[test]
    fn replace_lines_discard_what_came_before_them() {
        let u = parse(&format!(
            "public_key={K1}\nallowed_ip=10.0.0.1/32\nreplace_allowed_ips=true\nallowed_ip=10.0.0.2/32\n\n"
        ))
        .unwrap();
        assert_eq!(
            u.peers[0].allowed_ips,
            vec!["10.0.0.2/32".parse::<IpNet>().unwrap()]
        );
    }

    #[test]
    fn empty_body_is_an_empty_update() {
        assert_eq!(parse("\n").unwrap(), ConfigUpdate::default());
    }

    #[test]
    fn malformed_bodies_get_the_error_codes_wireguard_go_uses() {
        let cases: Vec<(String, i32)> = vec![
            ("no equals sign\n\n".into(), -libc::EPROTO),
            ("listen_port=70000\n\n".into(), -libc::EINVAL),
            ("listen_port=-1\n\n".into(), -libc::EINVAL),
            ("listen_port=+5\n\n".into(), -libc::EINVAL),
            ("listen_port=\n\n".into(), -libc::EINVAL),
            ("fwmark=4294967296\n\n".into(), -libc::EINVAL),
            ("private_key=abc\n\n".into(), -libc::EINVAL),
            (format!("private_key={}zz\n\n", &K1[..62]), -libc::EINVAL),
            ("replace_peers=yes\n\n".into(), -libc::EINVAL),
            ("unknown_key=1\n\n".into(), -libc::EINVAL),
            ("allowed_ip=10.0.0.0/8\n\n".into(), -libc::EINVAL),
            (
                format!("public_key={K1}\nallowed_ip=10.0.0.0/33\n\n"),
                -libc::EINVAL,
            ),
            (
                format!("public_key={K1}\nallowed_ip=10.0.0.1\n\n"),
                -libc::EINVAL,
            ),
            (
                format!("public_key={K1}\nendpoint=example.com:51820\n\n"),
                -libc::EINVAL,
            ),
            (
                format!("public_key={K1}\nendpoint=10.0.0.1\n\n"),
                -libc::EINVAL,
            ),
            (
                format!("public_key={K1}\nprotocol_version=2\n\n"),
                -libc::EINVAL,
            ),
            (
                format!("public_key={K1}\npersistent_keepalive_interval=65536\n\n"),
                -libc::EINVAL,
            ),
            (format!("public_key={K1}\nremove=false\n\n"), -libc::EINVAL),
            (format!("public_key={K1}\nlisten_port=1\n\n"), -libc::EINVAL),
            ("public_key=\n\n".into(), -libc::EINVAL),
        ];
        for (body, errno) in cases {
            let err = parse(&body).expect_err(&body);
            assert_eq!(err.errno(), errno, "{body:?}: {err}");
            assert_eq!(render_error(&err), format!("errno={errno}\n\n"));
        }
    }

    #[test]
    fn hex_keys_round_trip_in_either_case() {
        let k = decode_hex_key(K1).unwrap();
        assert_eq!(encode_hex_key(&k), K1);
        assert_eq!(decode_hex_key(&K1.to_uppercase()), Some(k));
        assert_eq!(decode_hex_key(&K1[1..]), None);
        assert_eq!(decode_hex_key("é".repeat(32).as_str()), None);
    }

    #[test]
    fn get_answer_has_wireguard_go_fields_in_order() {
        // Rotation state (extra keys, a peer's next key, its session slots) is never shown:
        // `wg show` sees one private key and one key per peer.
        let snapshot = DeviceSnapshot {
            public_key: decode_hex_key(K2),
            extra_public_keys: vec![decode_hex_key(PSK).unwrap()],
            listen_port: 51820,
            fwmark: 0,
            handshakes_rate_limited: 9,
            peers: vec![PeerSnapshot {
                public_key: decode_hex_key(K2).unwrap(),
                next_public_key: decode_hex_key(PSK),
                sessions: vec![SessionSnapshot {
                    local_public_key: decode_hex_key(PSK).unwrap(),
                    remote_public_key: decode_hex_key(PSK).unwrap(),
                    established: None,
                    rx_data_packets: 3,
                    active: true,
                }],
                preshared_key: None,
                endpoint: Some("[::ffff:192.0.2.1]:4000".parse().unwrap()),
                last_handshake: Some(
                    SystemTime::UNIX_EPOCH + Duration::new(1_700_000_123, 456_000_000),
                ),
                rx_bytes: 1000,
                tx_bytes: 2000,
                persistent_keepalive: 25,
                allowed_ips: vec![
                    "10.0.0.2/32".parse().unwrap(),
                    "fd00::2/128".parse().unwrap(),
                ],
            }],
        };
        let want = format!(
            "private_key={K1}\nlisten_port=51820\npublic_key={K2}\npreshared_key={}\n\
             protocol_version=1\nendpoint=192.0.2.1:4000\nlast_handshake_time_sec=1700000123\n\
             last_handshake_time_nsec=456000000\ntx_bytes=2000\nrx_bytes=1000\n\
             persistent_keepalive_interval=25\nallowed_ip=10.0.0.2/32\nallowed_ip=fd00::2/128\n\
             errno=0\n\n",
            "0".repeat(64)
        );
        let private = PrivateKey::from_bytes(decode_hex_key(K1).unwrap());
        assert_eq!(*render_get(&snapshot, Some(&private)), want);
    }

    #[test]
    fn get_answer_of_an_unconfigured_device_is_just_errno() {
        assert_eq!(*render_get(&DeviceSnapshot::default(), None), "errno=0\n\n");
    }

    #[test]
    fn a_get_answer_parses_back_as_the_same_configuration() {
        // `wg showconf` turns a get answer into a config that `wg setconf` sends back.
        let snapshot = DeviceSnapshot {
            public_key: None,
            extra_public_keys: Vec::new(),
            listen_port: 4242,
            fwmark: 7,
            handshakes_rate_limited: 0,
            peers: vec![PeerSnapshot {
                public_key: decode_hex_key(K2).unwrap(),
                next_public_key: None,
                sessions: Vec::new(),
                preshared_key: decode_hex_key(PSK),
                endpoint: Some("[fd00::1]:51820".parse().unwrap()),
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
                persistent_keepalive: 0,
                allowed_ips: vec!["10.9.0.0/16".parse().unwrap()],
            }],
        };
        let private = PrivateKey::from_bytes(decode_hex_key(K1).unwrap());
        let text = render_get(&snapshot, Some(&private));
        let mut p = SetParser::new();
        for line in text.lines() {
            // The fields only a get carries are skipped, as wg(8) does.
            if line.starts_with("last_handshake")
                || line.starts_with("tx_bytes")
                || line.starts_with("rx_bytes")
                || line.starts_with("errno")
                || line.is_empty()
            {
                continue;
            }
            assert!(p.feed(line).unwrap().is_none());
        }
        let u = p.finish();
        assert_eq!(u.private_key, Some(private));
        assert_eq!(u.listen_port, Some(4242));
        assert_eq!(u.fwmark, Some(7));
        let peer = &u.peers[0];
        assert_eq!(peer.preshared_key, decode_hex_key(PSK));
        assert_eq!(peer.endpoint, snapshot.peers[0].endpoint);
        assert_eq!(peer.persistent_keepalive, Some(0));
        assert_eq!(peer.allowed_ips, snapshot.peers[0].allowed_ips);
    }

    #[test]
    fn a_body_past_the_byte_cap_is_refused_and_stops_growing() {
        let mut p = SetParser::new();
        p.feed(&format!("public_key={K1}")).unwrap();
        let line = "allowed_ip=10.0.0.1/32";
        let mut refused = 0;
        for _ in 0..=MAX_SET_BYTES / (line.len() + 1) + 1 {
            match p.feed(line) {
                Ok(None) => {}
                Err(UapiError::TooLarge(limit)) => {
                    assert_eq!(limit, MAX_SET_BYTES);
                    refused += 1;
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(refused >= 1);
        let held = p.peer.as_ref().map_or(0, |peer| peer.allowed_ips.len());
        assert!(held * (line.len() + 1) <= MAX_SET_BYTES);
        // Even the terminating blank line is refused now: nothing gets applied.
        assert_eq!(p.feed(""), Err(UapiError::TooLarge(MAX_SET_BYTES)));
        assert_eq!(
            render_error(&UapiError::TooLarge(MAX_SET_BYTES)),
            format!("errno={}\n\n", -libc::EMSGSIZE)
        );
    }

    /// Lines made of the protocol's own keys, with plausible and hostile values.
    fn set_line() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let key = prop_oneof![
            Just("private_key".to_owned()),
            Just("listen_port".to_owned()),
            Just("fwmark".to_owned()),
            Just("replace_peers".to_owned()),
            Just("public_key".to_owned()),
            Just("preshared_key".to_owned()),
            Just("endpoint".to_owned()),
            Just("persistent_keepalive_interval".to_owned()),
            Just("replace_allowed_ips".to_owned()),
            Just("allowed_ip".to_owned()),
            Just("protocol_version".to_owned()),
            Just("remove".to_owned()),
            Just("update_only".to_owned()),
            "[a-z_]{0,12}",
        ];
        let value = prop_oneof![
            Just(K1.to_owned()),
            Just(K2.to_owned()),
            Just("true".to_owned()),
            "[0-9]{1,12}",
            "[0-9a-fA-F]{60,68}",
            "([0-9]{1,3}\\.){3}[0-9]{1,3}(/[0-9]{1,2})?(:[0-9]{1,5})?",
            "\\[[0-9a-f:%]{0,40}\\]:[0-9]{1,5}",
            ".{0,80}",
        ];
        (key, value).prop_map(|(k, v)| format!("{k}={v}"))
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics_and_state_is_bounded_by_input(
            lines in proptest::collection::vec(".{0,200}", 0..64),
        ) {
            let mut p = SetParser::new();
            let mut fed = 0usize;
            for line in &lines {
                fed += line.len() + 1;
                if let Ok(Some(_)) = p.feed(line) {
                    break;
                }
                proptest::prop_assert!(p.bytes() <= fed);
            }
        }

        #[test]
        fn arbitrary_key_value_lines_never_panic_and_every_error_has_a_code(
            lines in proptest::collection::vec(set_line(), 0..64),
        ) {
            let mut p = SetParser::new();
            for line in &lines {
                match p.feed(line) {
                    Ok(_) => {}
                    Err(e) => {
                        let errno = e.errno();
                        proptest::prop_assert!(errno == -libc::EINVAL || errno == -libc::EPROTO);
                        proptest::prop_assert!(render_error(&e).ends_with("\n\n"));
                    }
                }
                // Every peer and allowed IP held came from a line of its own.
                let peers = p.update.peers.len() + usize::from(p.peer.is_some());
                let ips: usize = p.update.peers.iter().chain(p.peer.iter())
                    .map(|peer| peer.allowed_ips.len()).sum();
                proptest::prop_assert!(peers + ips <= lines.len());
            }
            let _ = p.finish();
        }

        #[test]
        fn arbitrary_bytes_as_lossy_lines_never_panic(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048),
        ) {
            let text = String::from_utf8_lossy(&bytes);
            let mut p = SetParser::new();
            for line in text.split('\n') {
                let _ = p.feed(line);
            }
            let _ = p.finish();
        }
    }
}
