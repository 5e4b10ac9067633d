//! WireGuard public keys: their text form, which keys are refused, and which peer keeps a key
//! that two peers claim.
//!
//! This module owns the validity of a *public* key as published in a `MeshPeer`. It must not
//! generate, hold or see private keys (the node agent does that), and does no Curve25519
//! arithmetic: refusing low-order points is a comparison against a fixed list.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

/// Length of a Curve25519 public key in bytes.
pub const KEY_LEN_BYTES: usize = 32;

/// Length of a public key in standard base64 with padding, as `wg pubkey` prints it.
pub const KEY_LEN_BASE64: usize = 44;

/// How many base64 characters [`PublicKey::short`] shows.
pub const SHORT_KEY_LEN_CHARS: usize = 8;

/// Encodings of the points of small order on Curve25519 (and their twist) as X25519
/// u-coordinates, little-endian.
///
/// This is the list libsodium checks in `has_small_order()` before
/// `crypto_scalarmult_curve25519` (`crypto_scalarmult/curve25519/ref10/x25519_ref10.c`), which
/// in turn comes from the table of points to reject on <https://cr.yp.to/ecdh.html>. A
/// Diffie-Hellman exchange with any of these gives a shared secret the peer's private key does
/// not influence. Like libsodium, [`is_low_order`] ignores the top bit of the last byte (X25519
/// masks it off), so each entry also stands for its encoding with that bit set; together with
/// `p`, `p - 1` and `p + 1` this covers the non-canonical encodings, as `u + p` is not
/// representable in 255 bits for the other entries.
const LOW_ORDER_POINTS: [[u8; KEY_LEN_BYTES]; 7] = [
    // 0 (order 4)
    [0; 32],
    // 1 (order 1)
    [
        0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0,
    ],
    // 325606250916557431795983626356110631294008115727848805560023387167927233504 (order 8)
    [
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4,
        0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49,
        0xb8, 0x00,
    ],
    // 39382357235489614581723060781553021112529911719440698176882885853963445705823 (order 8)
    [
        0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83, 0xef,
        0x5b, 0x04, 0x44, 0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd, 0xd0, 0x9f,
        0x11, 0x57,
    ],
    // p - 1 (order 2)
    [
        0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
    // p, a non-canonical 0 (order 4)
    [
        0xed, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
    // p + 1, a non-canonical 1 (order 1)
    [
        0xee, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
];

/// Whether `bytes` encode a point of small order: one of the seven u-coordinates libsodium's
/// `has_small_order()` refuses (0, 1, two points of order 8, p - 1, p, p + 1), with the top bit
/// of the last byte ignored as X25519 ignores it.
///
/// Public keys are public, so this does not need to run in constant time.
pub fn is_low_order(bytes: &[u8; KEY_LEN_BYTES]) -> bool {
    let mut masked = *bytes;
    masked[KEY_LEN_BYTES - 1] &= 0x7f;
    LOW_ORDER_POINTS.contains(&masked)
}

/// Why a string is not an acceptable WireGuard public key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The wrong number of characters.
    #[error(
        "public key is {len} characters long; a WireGuard public key is {KEY_LEN_BASE64} \
         characters of standard base64 ending in '=', as printed by `wg pubkey`"
    )]
    WrongLength {
        /// Characters given.
        len: usize,
    },
    /// Not standard base64 with canonical padding and zero trailing bits.
    #[error("public key is not standard base64 ({detail}); copy it from `wg pubkey`")]
    NotBase64 {
        /// What the decoder reported.
        detail: String,
    },
    /// 44 characters that decode to something other than 32 bytes (e.g. `==` padding).
    #[error("public key decodes to {len} bytes; a WireGuard public key is {KEY_LEN_BYTES} bytes")]
    WrongByteLength {
        /// Bytes decoded.
        len: usize,
    },
    /// The all-zero key, the usual placeholder.
    #[error("public key is all zeros, a placeholder rather than a key")]
    AllZero,
    /// One of the low-order points.
    #[error(
        "public key is a point of small order on Curve25519; a handshake with it would give a \
         shared secret that does not depend on any private key"
    )]
    LowOrder,
}

/// A WireGuard (Curve25519) public key that is neither all zeros nor of small order.
///
/// Its text form ([`FromStr`], [`fmt::Display`], serde) is standard base64 with padding, 44
/// characters; the canonical encoding is required, so a key's text form round-trips exactly.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PublicKey([u8; KEY_LEN_BYTES]);

impl PublicKey {
    /// Accepts raw key bytes unless they are all zeros or a low-order point.
    pub fn from_bytes(bytes: [u8; KEY_LEN_BYTES]) -> Result<PublicKey, KeyError> {
        if bytes == [0; KEY_LEN_BYTES] {
            Err(KeyError::AllZero)
        } else if is_low_order(&bytes) {
            Err(KeyError::LowOrder)
        } else {
            Ok(PublicKey(bytes))
        }
    }

    /// The raw key bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN_BYTES] {
        &self.0
    }

    /// The first [`SHORT_KEY_LEN_CHARS`] base64 characters, for logs and messages.
    pub fn short(&self) -> String {
        let mut s = self.to_string();
        s.truncate(SHORT_KEY_LEN_CHARS);
        s
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<PublicKey, KeyError> {
        let len = s.chars().count();
        if len != KEY_LEN_BASE64 {
            return Err(KeyError::WrongLength { len });
        }
        let decoded = STANDARD.decode(s).map_err(|e| KeyError::NotBase64 {
            detail: e.to_string(),
        })?;
        let bytes: [u8; KEY_LEN_BYTES] = decoded
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::WrongByteLength { len: decoded.len() })?;
        PublicKey::from_bytes(bytes)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({}…)", self.short())
    }
}

impl TryFrom<String> for PublicKey {
    type Error = KeyError;

    fn try_from(s: String) -> Result<PublicKey, KeyError> {
        s.parse()
    }
}

impl From<PublicKey> for String {
    fn from(key: PublicKey) -> String {
        key.to_string()
    }
}

/// What a claimed key is used for. A key in use outranks a key announced for rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum KeyUse {
    /// The peer's current key (`publicKey`).
    Current,
    /// A key the peer will rotate to (`nextPublicKey`).
    Next,
}

/// One peer's claim on a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyClaim {
    /// The claiming peer's name.
    pub peer: String,
    /// When the peer was created (`metadata.creationTimestamp`).
    pub created: SystemTime,
    /// Whether the key is in use or announced.
    pub usage: KeyUse,
    /// The key.
    pub key: PublicKey,
}

/// A key some other peer holds already.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("public key {}… is already used by peer {other}", .key.short())]
pub struct DuplicateKey {
    /// The key.
    pub key: PublicKey,
    /// The peer that keeps it.
    pub other: String,
}

/// Decides, for every claim, whether its peer may use the key.
///
/// Returns one entry per claim, in the same order: `None` when the claim stands, or the peer
/// that keeps the key. Of the peers claiming a key, the one that keeps it is the one whose claim
/// ranks first by ([`KeyUse`], creation time, name): a key in use beats a key announced for
/// rotation, then the older peer wins, then the name breaks ties. A peer claiming the same key
/// twice (e.g. as current and next) is not a duplicate of itself. The result does not depend on
/// the order of `claims`.
pub fn find_duplicate_keys(claims: &[KeyClaim]) -> Vec<Option<DuplicateKey>> {
    let mut keeper: BTreeMap<PublicKey, (KeyUse, SystemTime, &str)> = BTreeMap::new();
    for c in claims {
        let rank = (c.usage, c.created, c.peer.as_str());
        keeper
            .entry(c.key)
            .and_modify(|best| *best = (*best).min(rank))
            .or_insert(rank);
    }
    claims
        .iter()
        .map(|c| match keeper.get(&c.key) {
            Some((_, _, owner)) if *owner != c.peer => Some(DuplicateKey {
                key: c.key,
                other: (*owner).to_owned(),
            }),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    /// A real public key (from the `wg(8)` man page).
    const GOOD: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

    fn key(s: &str) -> PublicKey {
        s.parse().expect("test key is valid")
    }

    fn key_from_byte(b: u8) -> PublicKey {
        PublicKey::from_bytes([b; 32]).expect("test key is valid")
    }

    #[test]
    fn a_real_key_round_trips() {
        let k = key(GOOD);
        assert_eq!(k.to_string(), GOOD);
        assert_eq!(k.short(), "HIgo9xNz");
        assert_eq!(format!("{k:?}"), "PublicKey(HIgo9xNz…)");
        assert_eq!(PublicKey::from_bytes(*k.as_bytes()), Ok(k));
    }

    #[test]
    fn malformed_text_is_refused_with_the_reason() {
        type Check = fn(&KeyError) -> bool;
        let cases: [(&str, Check); 6] = [
            ("", |e| matches!(e, KeyError::WrongLength { len: 0 })),
            (&GOOD[..43], |e| {
                matches!(e, KeyError::WrongLength { len: 43 })
            }),
            // URL-safe alphabet instead of the standard one.
            ("HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8yk_=", |e| {
                matches!(e, KeyError::NotBase64 { .. })
            }),
            // Non-zero trailing bits: a second, non-canonical spelling of a key.
            ("HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykx=", |e| {
                matches!(e, KeyError::NotBase64 { .. })
            }),
            // 44 characters but 31 bytes.
            ("HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8yg==", |e| {
                matches!(e, KeyError::WrongByteLength { len: 31 })
            }),
            // 44 characters with no padding: 33 bytes.
            ("HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykwA", |e| {
                matches!(e, KeyError::WrongByteLength { len: 33 })
            }),
        ];
        for (input, want) in cases {
            let got = input.parse::<PublicKey>();
            assert!(got.as_ref().is_err_and(want), "{input:?} gave {got:?}");
        }
    }

    #[test]
    fn all_zero_and_low_order_keys_are_refused_in_every_encoding() {
        // The seven entries of libsodium's list and the same with the top bit set, written out
        // independently of LOW_ORDER_POINTS (computed with a Montgomery ladder: 8·u = ∞).
        let zero = [
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAIA=",
        ];
        let low_order = [
            "AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAIA=",
            "4Ot6fDtBuK4WVuP68Z/EatoJjeucMrH9hmIFFl9JuAA=",
            "4Ot6fDtBuK4WVuP68Z/EatoJjeucMrH9hmIFFl9JuIA=",
            "X5yVvKNQjCSx0LFVnIPvWwREXMRYHI6G2CJO3dCfEVc=",
            "X5yVvKNQjCSx0LFVnIPvWwREXMRYHI6G2CJO3dCfEdc=",
            "7P///////////////////////////////////////38=",
            "7P////////////////////////////////////////8=",
            "7f///////////////////////////////////////38=",
            "7f////////////////////////////////////////8=",
            "7v///////////////////////////////////////38=",
            "7v////////////////////////////////////////8=",
        ];
        assert_eq!(zero[0].parse::<PublicKey>(), Err(KeyError::AllZero));
        // With the top bit set the bytes are not all zero, but X25519 reads them as 0.
        assert_eq!(zero[1].parse::<PublicKey>(), Err(KeyError::LowOrder));
        for k in low_order {
            assert_eq!(k.parse::<PublicKey>(), Err(KeyError::LowOrder), "{k}");
        }
        // Neighbours of the listed points are ordinary keys.
        let mut neighbours = vec![[2u8; 32], LOW_ORDER_POINTS[4], LOW_ORDER_POINTS[2]];
        neighbours[0][1..].fill(0); // u = 2
        neighbours[1][0] = 0xeb; // p - 2
        neighbours[2][0] ^= 1;
        for bytes in neighbours {
            assert!(PublicKey::from_bytes(bytes).is_ok(), "{bytes:02x?}");
        }
    }

    #[test]
    fn serde_uses_the_base64_text() {
        fn assert_serde<T: Serialize + for<'de> Deserialize<'de>>() {}
        assert_serde::<PublicKey>();
        assert_eq!(String::from(key(GOOD)), GOOD);
        assert_eq!(
            PublicKey::try_from(String::from("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")),
            Err(KeyError::AllZero)
        );
    }

    fn claim(peer: &str, created_secs: u64, usage: KeyUse, key: PublicKey) -> KeyClaim {
        KeyClaim {
            peer: peer.into(),
            created: UNIX_EPOCH + Duration::from_secs(created_secs),
            usage,
            key,
        }
    }

    #[test]
    fn the_older_peer_keeps_a_duplicated_key() {
        let k = key_from_byte(7);
        let other = key_from_byte(9);
        let claims = [
            claim("young", 200, KeyUse::Current, k),
            claim("old", 100, KeyUse::Current, k),
            claim("alone", 50, KeyUse::Current, other),
        ];
        let got = find_duplicate_keys(&claims);
        assert_eq!(
            got,
            vec![
                Some(DuplicateKey {
                    key: k,
                    other: "old".into()
                }),
                None,
                None
            ]
        );
        let message = got[0].as_ref().map(ToString::to_string).unwrap_or_default();
        assert!(
            message.contains("old") && message.contains(&k.short()),
            "{message}"
        );
    }

    #[test]
    fn ties_break_by_name_and_a_key_in_use_beats_an_announced_one() {
        let k = key_from_byte(7);
        let got = find_duplicate_keys(&[
            claim("b", 100, KeyUse::Current, k),
            claim("a", 100, KeyUse::Current, k),
        ]);
        assert_eq!(got[0].as_ref().map(|d| d.other.as_str()), Some("a"));
        assert_eq!(got[1], None);

        // An old node announcing someone's key as its next key does not take it from them.
        let got = find_duplicate_keys(&[
            claim("old-node", 1, KeyUse::Next, k),
            claim("laptop", 500, KeyUse::Current, k),
        ]);
        assert_eq!(got[0].as_ref().map(|d| d.other.as_str()), Some("laptop"));
        assert_eq!(got[1], None);

        // Current and next being the same key is not a duplicate of oneself.
        let got = find_duplicate_keys(&[
            claim("n", 1, KeyUse::Current, k),
            claim("n", 1, KeyUse::Next, k),
        ]);
        assert_eq!(got, vec![None, None]);
    }
}
