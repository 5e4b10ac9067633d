//! The node's WireGuard keys: generated from the OS RNG, kept in the agent's state directory
//! in one file of mode 0600, reused across restarts. During a key rotation the file also
//! holds the next key and the rotation's phase; after one, for external peers' grace period,
//! the retired key (see `wgmesh_core::rotation`).
//!
//! This module owns the key file and the only copy of the private key outside the device.
//! It must never log, print or serialise the private key anywhere but that file: the
//! private key type's `Debug` is redacted, and only [`NodeKey::public_base64`] leaves.
//! Every copy of a private key it makes (bytes, base64, the file's text) is in a zeroizing
//! buffer sized before the key goes in, so no reallocation leaves one behind.
//!
//! The file is never followed through a symlink: it is read with `O_NOFOLLOW` and refused if
//! group or others may read it, and written through a fresh temporary file (`O_EXCL`,
//! `O_NOFOLLOW`, mode 0600), fsynced, renamed over it, with the directory fsynced after.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;
use wgmesh_core::rotation::{self, KeyRole, Phase};
use wgmesh_device::config::{Key, PrivateKey};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

/// The file the key lives in, under the state directory.
pub const KEY_FILE: &str = "wireguard-key.json";

/// Largest key file read; a real one is well under 4 KiB.
const MAX_KEY_FILE_BYTES: u64 = 1 << 20;

/// Length of a key in base64.
const KEY_BASE64_BYTES: usize = 44;

/// Base64 of a private key in the file, zeroized on drop.
struct SecretText(Zeroizing<String>);

impl Serialize for SecretText {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SecretText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = SecretText;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a base64 private key")
            }
            // serde_json hands over a slice of the (zeroizing) input when the string has no
            // escapes, which a key never has; no owned copy is made on the way.
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SecretText, E> {
                let mut s = Zeroizing::new(String::with_capacity(v.len()));
                s.push_str(v);
                Ok(SecretText(s))
            }
        }
        d.deserialize_str(Visitor)
    }
}

impl SecretText {
    fn encode(secret: &StaticSecret) -> Self {
        let bytes = Zeroizing::new(secret.to_bytes());
        let mut s = Zeroizing::new(String::with_capacity(KEY_BASE64_BYTES));
        STANDARD.encode_string(*bytes, &mut s);
        SecretText(s)
    }
}

/// Errors reading or writing the key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a wgmesh key file: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("{path} is a symbolic link; the key file must be a regular file")]
    Symlink { path: PathBuf },
    #[error("{path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path} is larger than {limit} bytes")]
    TooLarge { path: PathBuf, limit: u64 },
    #[error(
        "{path} has mode {mode:o}; it holds a private key and must not be readable by others (chmod 600)"
    )]
    Permissions { path: PathBuf, mode: u32 },
}

/// One stored key besides the current one.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredKey {
    private_key: SecretText,
    /// Seconds since the Unix epoch.
    created_at: u64,
    /// For the previous key: until when it is still answered (seconds since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    until: Option<u64>,
}

/// Where a rotation is, as stored.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredPhase {
    /// `prepared` or `switched`.
    name: String,
    /// Seconds since the epoch the phase began.
    since: u64,
    /// The rotation is a revocation.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    revoke: bool,
}

/// The key file's contents: the current key at the top level (the layout of a file from
/// before rotation existed), and the rotation's keys and phase beside it.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyFile {
    private_key: SecretText,
    /// Seconds since the Unix epoch.
    created_at: u64,
    generation: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next: Option<StoredKey>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    previous: Vec<StoredKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    phase: Option<StoredPhase>,
    /// When the last rotation of the current key was abandoned (seconds since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    abandoned_at: Option<u64>,
    /// Peers the last rotation went on without.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    laggards: Vec<String>,
    /// The last rotation was a revocation.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    revoked: bool,
}

/// The node's key pair.
#[derive(Clone)]
pub struct NodeKey {
    secret: StaticSecret,
    public: PublicKey,
    /// When the key was generated.
    pub created_at: SystemTime,
    /// How many times the node's key has been rotated.
    pub generation: i64,
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeKey")
            .field("public", &self.public_base64())
            .field("private", &"<redacted>")
            .field("generation", &self.generation)
            .finish()
    }
}

impl NodeKey {
    /// A fresh key from the OS RNG.
    pub fn generate(now: SystemTime, generation: i64) -> NodeKey {
        let secret = StaticSecret::random_from_rng(rand_core::OsRng);
        let public = PublicKey::from(&secret);
        NodeKey {
            secret,
            public,
            created_at: now,
            generation,
        }
    }

    /// The public key, base64, as published in the node's `MeshPeer` status.
    pub fn public_base64(&self) -> String {
        STANDARD.encode(self.public.as_bytes())
    }

    /// The public key's bytes.
    pub fn public_bytes(&self) -> [u8; 32] {
        *self.public.as_bytes()
    }

    /// The private key, for configuring the device in-process.
    pub fn private_key(&self) -> PrivateKey {
        PrivateKey::from_bytes(self.secret.to_bytes())
    }
}

/// Everything the node keeps about its keys: the current key, during a rotation the next
/// one and the phase, after one the retired key while external peers may still use it.
/// Stored in one file, written atomically, so a crash never separates a phase from its keys.
/// The secrets zeroize when dropped (x25519-dalek's `zeroize` feature).
#[derive(Debug)]
pub struct KeyState {
    /// The key of the current generation.
    pub current: NodeKey,
    /// The next key, from `Prepared` until it is retired into `current`.
    pub next: Option<NodeKey>,
    /// Keys no longer the node's but still answered, each until its deadline: a retired key
    /// during external peers' grace period, an abandoned next key for the acknowledge
    /// timeout.
    pub previous: Vec<(NodeKey, SystemTime)>,
    /// The rotation's phase.
    pub phase: Phase,
    /// Peers the last rotation went on without.
    pub laggards: Vec<String>,
    /// The last completed rotation was a revocation (for status: the one under way says so
    /// in its phase).
    pub revoked: bool,
    /// When the last rotation of the current key was abandoned.
    pub abandoned_at: Option<SystemTime>,
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn from_secs(s: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s)
}

impl KeyState {
    /// A copy of the keys as the rotation's keyring (`wgmesh_core::rotation::Keyring`).
    pub fn ring(&self) -> rotation::Keyring<NodeKey> {
        rotation::Keyring {
            current: self.current.clone(),
            next: self.next.clone(),
            previous: self.previous.clone(),
            phase: self.phase,
            laggards: self.laggards.clone(),
            revoked: self.revoked,
            abandoned_at: self.abandoned_at,
        }
    }

    /// The keys a keyring holds.
    pub fn from_ring(ring: rotation::Keyring<NodeKey>) -> KeyState {
        KeyState {
            current: ring.current,
            next: ring.next,
            previous: ring.previous,
            phase: ring.phase,
            laggards: ring.laggards,
            revoked: ring.revoked,
            abandoned_at: ring.abandoned_at,
        }
    }

    /// Loads the keys from `state_dir`, or generates and stores a first key if there is
    /// none. Returns the state and whether a key was generated now. A key file that is a
    /// symlink, not a regular file, or readable by group or others is refused.
    pub fn load_or_generate(
        state_dir: &Path,
        now: SystemTime,
    ) -> Result<(KeyState, bool), KeyFileError> {
        let path = state_dir.join(KEY_FILE);
        match read_key_file(&path) {
            Ok(text) => Ok((parse(&path, &text)?, false)),
            Err(KeyFileError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                let state = KeyState {
                    current: NodeKey::generate(now, 0),
                    next: None,
                    previous: Vec::new(),
                    phase: Phase::Steady { generation: 0 },
                    laggards: Vec::new(),
                    revoked: false,
                    abandoned_at: None,
                };
                state.store(state_dir)?;
                Ok((state, true))
            }
            Err(e) => Err(e),
        }
    }

    /// Writes the state atomically: a fresh 0600 temporary file (a stale one from a crash is
    /// unlinked first; a symlink in its place is never followed), fsynced, renamed over the
    /// old one, the directory fsynced. A key left out (a retired one) is gone from disk once
    /// this returns.
    pub fn store(&self, state_dir: &Path) -> Result<(), KeyFileError> {
        let path = state_dir.join(KEY_FILE);
        let werr = |source| KeyFileError::Write {
            path: path.clone(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(werr)?;
        let stored = |k: &NodeKey, until: Option<SystemTime>| StoredKey {
            private_key: SecretText::encode(&k.secret),
            created_at: secs(k.created_at),
            until: until.map(secs),
        };
        let body = KeyFile {
            private_key: SecretText::encode(&self.current.secret),
            created_at: secs(self.current.created_at),
            generation: self.current.generation,
            next: self.next.as_ref().map(|k| stored(k, None)),
            previous: self
                .previous
                .iter()
                .map(|(k, u)| stored(k, Some(*u)))
                .collect(),
            phase: match self.phase {
                Phase::Steady { .. } => None,
                Phase::Prepared { since, revoke, .. } => Some(StoredPhase {
                    name: "prepared".into(),
                    since: secs(since),
                    revoke,
                }),
                Phase::Switched { since, revoke, .. } => Some(StoredPhase {
                    name: "switched".into(),
                    since: secs(since),
                    revoke,
                }),
            },
            laggards: self.laggards.clone(),
            revoked: self.revoked,
            abandoned_at: self.abandoned_at.map(secs),
        };
        let text = to_json(&body).map_err(|e| werr(std::io::Error::other(e)))?;
        let tmp = state_dir.join(format!(".{KEY_FILE}.tmp"));
        match fs::remove_file(&tmp) {
            Ok(()) => tracing::info!(path = %tmp.display(), "removed a stale temporary key file"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(werr(e)),
        }
        {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&tmp)
                .map_err(werr)?;
            // The umask cannot widen 0600, but an inherited ACL default could: be explicit.
            f.set_permissions(fs::Permissions::from_mode(0o600))
                .map_err(werr)?;
            f.write_all(&text).map_err(werr)?;
            f.sync_all().map_err(werr)?;
        }
        fs::rename(&tmp, &path).map_err(werr)?;
        fs::File::open(state_dir)
            .and_then(|dir| dir.sync_all())
            .map_err(werr)?;
        Ok(())
    }

    /// The device's keys in this state, as their public halves (to compare with what the
    /// device was given without keeping private keys around).
    pub fn device_public_keys(&self) -> (Key, Vec<Key>) {
        let (primary, extras) = self.device_keys();
        (
            primary.public_key(),
            extras.iter().map(PrivateKey::public_key).collect(),
        )
    }

    /// The keys in `role`.
    pub fn keys(&self, role: KeyRole) -> Vec<&NodeKey> {
        match role {
            KeyRole::Current => vec![&self.current],
            KeyRole::Next => self.next.iter().collect(),
            KeyRole::Previous => self.previous.iter().map(|(k, _)| k).collect(),
        }
    }

    /// The device's keys in this state: (initiating key, answered-only keys).
    pub fn device_keys(&self) -> (PrivateKey, Vec<PrivateKey>) {
        let (primary, extras) = rotation::device_keys(self.phase, !self.previous.is_empty());
        let primary = self
            .keys(primary)
            .first()
            .copied()
            .unwrap_or(&self.current)
            .private_key();
        let extras = extras
            .into_iter()
            .flat_map(|r| self.keys(r))
            .map(NodeKey::private_key)
            .collect();
        (primary, extras)
    }
}

/// Reads the key file into a zeroizing buffer: never through a symlink, only a regular file
/// that group and others cannot read, at most [`MAX_KEY_FILE_BYTES`].
fn read_key_file(path: &Path) -> Result<Zeroizing<String>, KeyFileError> {
    let rerr = |source| KeyFileError::Read {
        path: path.to_owned(),
        source,
    };
    let mut file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                KeyFileError::Symlink {
                    path: path.to_owned(),
                }
            } else {
                rerr(e)
            }
        })?;
    // Checked on the open descriptor: what was opened is what is judged.
    let meta = file.metadata().map_err(rerr)?;
    if !meta.file_type().is_file() {
        return Err(KeyFileError::NotAFile {
            path: path.to_owned(),
        });
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyFileError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    if meta.len() > MAX_KEY_FILE_BYTES {
        return Err(KeyFileError::TooLarge {
            path: path.to_owned(),
            limit: MAX_KEY_FILE_BYTES,
        });
    }
    // Room for the whole file and one more byte, so reading to the end never reallocates
    // (a file that grew meanwhile is cut at the cap rather than copied).
    let cap = usize::try_from(meta.len()).unwrap_or(0) + 1;
    let mut bytes = Zeroizing::new(Vec::with_capacity(cap));
    (&mut file)
        .take(cap as u64)
        .read_to_end(&mut bytes)
        .map_err(rerr)?;
    if bytes.len() >= cap {
        return Err(KeyFileError::Malformed {
            path: path.to_owned(),
            reason: "the file changed while it was read".into(),
        });
    }
    match String::from_utf8(std::mem::take(&mut *bytes)) {
        Ok(text) => Ok(Zeroizing::new(text)),
        Err(e) => {
            // Take the bytes back so they are zeroized too.
            *bytes = e.into_bytes();
            Err(KeyFileError::Malformed {
                path: path.to_owned(),
                reason: "not UTF-8".into(),
            })
        }
    }
}

/// JSON of the key file in a zeroizing buffer of its exact size.
fn to_json(body: &KeyFile) -> serde_json::Result<Zeroizing<Vec<u8>>> {
    /// Counts bytes, to size the buffer before any key goes in.
    struct Count(usize);
    impl Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, body)?;
    let mut out = Zeroizing::new(Vec::with_capacity(count.0));
    serde_json::to_writer(&mut *out, body)?;
    Ok(out)
}

fn parse_secret(
    text: &SecretText,
    what: &str,
    malformed: &dyn Fn(&str) -> KeyFileError,
) -> Result<StaticSecret, KeyFileError> {
    // Decoded straight into a zeroizing array; base64 of 32 bytes needs no more room than 33.
    let mut bytes = Zeroizing::new([0u8; 33]);
    let n = STANDARD
        .decode_slice(text.0.trim(), &mut bytes[..])
        .map_err(|_| malformed(&format!("{what} is not base64 of 32 bytes")))?;
    if n != 32 {
        return Err(malformed(&format!("{what} is not 32 bytes")));
    }
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&bytes[..32]);
    Ok(StaticSecret::from(*key))
}

fn node_key(secret: StaticSecret, created_at: u64, generation: i64) -> NodeKey {
    NodeKey {
        public: PublicKey::from(&secret),
        secret,
        created_at: from_secs(created_at),
        generation,
    }
}

fn parse(path: &Path, text: &str) -> Result<KeyState, KeyFileError> {
    let malformed = |reason: &str| KeyFileError::Malformed {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let file: KeyFile = serde_json::from_str(text).map_err(|e| malformed(&e.to_string()))?;
    let generation = file.generation;
    let current = node_key(
        parse_secret(&file.private_key, "privateKey", &malformed)?,
        file.created_at,
        generation,
    );
    let next = match &file.next {
        Some(k) => Some(node_key(
            parse_secret(&k.private_key, "next.privateKey", &malformed)?,
            k.created_at,
            generation + 1,
        )),
        None => None,
    };
    let previous = file
        .previous
        .iter()
        .map(|k| {
            Ok((
                node_key(
                    parse_secret(&k.private_key, "previous.privateKey", &malformed)?,
                    k.created_at,
                    generation - 1,
                ),
                from_secs(k.until.unwrap_or(0)),
            ))
        })
        .collect::<Result<Vec<_>, KeyFileError>>()?;
    let phase = match (
        file.phase
            .as_ref()
            .map(|p| (p.name.as_str(), p.since, p.revoke)),
        &next,
    ) {
        (None, _) => Phase::Steady { generation },
        (Some(("prepared", since, revoke)), Some(_)) => Phase::Prepared {
            generation,
            since: from_secs(since),
            revoke,
        },
        (Some(("switched", since, revoke)), Some(_)) => Phase::Switched {
            generation,
            since: from_secs(since),
            revoke,
        },
        (Some((name, _, _)), Some(_)) => {
            return Err(malformed(&format!("unknown phase {name:?}")));
        }
        (Some(_), None) => return Err(malformed("a rotation phase without a next key")),
    };
    Ok(KeyState {
        current,
        next,
        previous,
        phase,
        laggards: file.laggards,
        revoked: file.revoked,
        abandoned_at: file.abandoned_at.map(from_secs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "wgmesh-key-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("tempdir");
        d
    }

    #[test]
    fn a_key_is_generated_once_with_mode_0600_and_reused() {
        let dir = tempdir();
        let (k1, fresh) = KeyState::load_or_generate(&dir, SystemTime::now()).expect("generate");
        let k1 = k1.current;
        assert!(fresh);
        let mode = fs::metadata(dir.join(KEY_FILE))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let (k2, fresh) = KeyState::load_or_generate(&dir, SystemTime::now()).expect("load");
        let k2 = k2.current;
        assert!(!fresh);
        assert_eq!(k1.public_base64(), k2.public_base64());
        assert_eq!(k1.private_key(), k2.private_key());
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_world_readable_key_file_is_refused() {
        let dir = tempdir();
        KeyState::load_or_generate(&dir, SystemTime::now()).expect("generate");
        fs::set_permissions(dir.join(KEY_FILE), fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = KeyState::load_or_generate(&dir, SystemTime::now()).expect_err("must refuse");
        assert!(
            matches!(err, KeyFileError::Permissions { mode: 0o644, .. }),
            "{err}"
        );
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn debug_output_never_contains_the_private_key() {
        let key = NodeKey::generate(SystemTime::now(), 0);
        let private = STANDARD.encode(key.private_key().as_bytes());
        let shown = format!("{key:?}");
        assert!(!shown.contains(&private));
        assert!(shown.contains(&key.public_base64()));
    }

    #[test]
    fn a_rotation_survives_a_restart_with_its_keys_and_phase() {
        let dir = tempdir();
        let (mut state, _) = KeyState::load_or_generate(&dir, SystemTime::now()).expect("gen");
        let since = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
        state.next = Some(NodeKey::generate(since, 1));
        // A revocation stays one across a restart: it decides how the old key is retired.
        state.phase = Phase::Switched {
            generation: 0,
            since,
            revoke: true,
        };
        state.store(&dir).expect("store");
        let (back, fresh) = KeyState::load_or_generate(&dir, SystemTime::now()).expect("load");
        assert!(!fresh);
        assert_eq!(back.phase, state.phase);
        let next = back.next.as_ref().expect("next kept");
        assert_eq!(
            next.public_base64(),
            state
                .next
                .as_ref()
                .map(NodeKey::public_base64)
                .unwrap_or_default()
        );
        assert_eq!(next.generation, 1);
        // Switched: the device initiates with the next key and still answers the current one.
        let (primary, extras) = back.device_keys();
        assert_eq!(primary, next.private_key());
        assert_eq!(extras, vec![back.current.private_key()]);
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_retired_key_is_kept_only_with_its_deadline_and_a_file_without_rotation_loads() {
        let dir = tempdir();
        let old = NodeKey::generate(SystemTime::now(), 0);
        let until = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_900_000_000);
        let state = KeyState {
            current: NodeKey::generate(SystemTime::now(), 1),
            next: None,
            previous: vec![(old, until)],
            phase: Phase::Steady { generation: 1 },
            laggards: vec!["slow".into()],
            revoked: true,
            abandoned_at: None,
        };
        state.store(&dir).expect("store");
        let (back, _) = KeyState::load_or_generate(&dir, SystemTime::now()).expect("load");
        assert_eq!(back.previous.first().map(|(_, u)| *u), Some(until));
        assert_eq!(back.laggards, vec!["slow".to_string()]);
        assert!(back.revoked);
        assert_eq!(back.device_keys().1.len(), 1);
        // The layout from before rotation existed: just the current key.
        let legacy = format!(
            r#"{{"privateKey":"{}","createdAt":1700000000,"generation":0}}"#,
            STANDARD.encode(back.current.private_key().as_bytes())
        );
        let parsed = parse(Path::new("k"), &legacy).expect("legacy");
        assert_eq!(parsed.phase, Phase::Steady { generation: 0 });
        assert!(parsed.next.is_none() && parsed.previous.is_empty());
        // A phase without its next key is refused, not guessed at.
        let broken = format!(
            r#"{{"privateKey":"{}","createdAt":1,"generation":0,"phase":{{"name":"switched","since":1}}}}"#,
            STANDARD.encode(back.current.private_key().as_bytes())
        );
        assert!(matches!(
            parse(Path::new("k"), &broken),
            Err(KeyFileError::Malformed { .. })
        ));
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_key_file_behind_a_symlink_is_refused() {
        let dir = tempdir();
        let elsewhere = dir.join("elsewhere.json");
        KeyState::load_or_generate(&dir, SystemTime::now()).expect("generate");
        fs::rename(dir.join(KEY_FILE), &elsewhere).expect("move");
        std::os::unix::fs::symlink(&elsewhere, dir.join(KEY_FILE)).expect("symlink");
        let err = KeyState::load_or_generate(&dir, SystemTime::now()).expect_err("must refuse");
        assert!(matches!(err, KeyFileError::Symlink { .. }), "{err}");
        assert!(err.to_string().contains(KEY_FILE), "{err}");
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn the_refusal_of_a_group_readable_file_names_the_path_and_mode() {
        let dir = tempdir();
        KeyState::load_or_generate(&dir, SystemTime::now()).expect("generate");
        fs::set_permissions(dir.join(KEY_FILE), fs::Permissions::from_mode(0o640)).expect("chmod");
        let err = KeyState::load_or_generate(&dir, SystemTime::now()).expect_err("must refuse");
        let shown = err.to_string();
        assert!(
            shown.contains(&dir.join(KEY_FILE).display().to_string()),
            "{shown}"
        );
        assert!(shown.contains("640"), "{shown}");
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_stale_temporary_file_or_a_symlink_in_its_place_is_replaced_not_followed() {
        let dir = tempdir();
        let (state, _) = KeyState::load_or_generate(&dir, SystemTime::now()).expect("generate");
        let tmp = dir.join(format!(".{KEY_FILE}.tmp"));
        let victim = dir.join("victim");
        fs::write(&victim, "untouched").expect("victim");
        std::os::unix::fs::symlink(&victim, &tmp).expect("symlink");
        state.store(&dir).expect("store over a planted symlink");
        assert_eq!(fs::read_to_string(&victim).expect("victim"), "untouched");
        assert!(
            fs::symlink_metadata(&tmp).is_err(),
            "the temporary file is gone"
        );
        // A leftover regular temporary file from a crash is no obstacle either.
        fs::write(&tmp, "half a key").expect("stale");
        state.store(&dir).expect("store over a stale file");
        let meta = fs::symlink_metadata(dir.join(KEY_FILE)).expect("meta");
        assert!(meta.file_type().is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let (back, _) = KeyState::load_or_generate(&dir, SystemTime::now()).expect("load");
        assert_eq!(back.current.private_key(), state.current.private_key());
        fs::remove_dir_all(&dir).ok();
    }
}
