//! The node's WireGuard keys: generated from the OS RNG, kept in the agent's state directory
//! in one file of mode 0600, reused across restarts. During a key rotation the file also
//! holds the next key and the rotation's phase; after one, for external peers' grace period,
//! the retired key (see `wgmesh_core::rotation`).
//!
//! This module owns the key file and the only copy of the private key outside the device.
//! It must never log, print or serialise the private key anywhere but that file: the
//! private key type's `Debug` is redacted, and only [`NodeKey::public_base64`] leaves.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;
use wgmesh_core::rotation::{self, KeyRole, Phase};
use x25519_dalek::{PublicKey, StaticSecret};

/// The file the key lives in, under the state directory.
pub const KEY_FILE: &str = "wireguard-key.json";

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
    #[error(
        "{path} has mode {mode:o}; it holds a private key and must not be readable by others (chmod 600)"
    )]
    Permissions { path: PathBuf, mode: u32 },
}

/// One stored key besides the current one.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredKey {
    private_key: String,
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
    private_key: String,
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

    /// The private key's bytes, for configuring the device in-process.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes()
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
    /// Loads the keys from `state_dir`, or generates and stores a first key if there is
    /// none. Returns the state and whether a key was generated now.
    pub fn load_or_generate(
        state_dir: &Path,
        now: SystemTime,
    ) -> Result<(KeyState, bool), KeyFileError> {
        let path = state_dir.join(KEY_FILE);
        match fs::metadata(&path) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(KeyFileError::Permissions { path, mode });
                }
                let text = fs::read_to_string(&path).map_err(|source| KeyFileError::Read {
                    path: path.clone(),
                    source,
                })?;
                Ok((parse(&path, &text)?, false))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
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
            Err(source) => Err(KeyFileError::Read { path, source }),
        }
    }

    /// Writes the state atomically: a 0600 temporary file, fsynced, renamed over the old
    /// one. A key left out (a retired one) is gone from disk once this returns.
    pub fn store(&self, state_dir: &Path) -> Result<(), KeyFileError> {
        let path = state_dir.join(KEY_FILE);
        let werr = |source| KeyFileError::Write {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(state_dir).map_err(werr)?;
        let stored = |k: &NodeKey, until: Option<SystemTime>| StoredKey {
            private_key: STANDARD.encode(k.secret.to_bytes()),
            created_at: secs(k.created_at),
            until: until.map(secs),
        };
        let body = KeyFile {
            private_key: STANDARD.encode(self.current.secret.to_bytes()),
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
        let text = serde_json::to_string(&body).map_err(|e| werr(std::io::Error::other(e)))?;
        let tmp = state_dir.join(format!(".{KEY_FILE}.tmp"));
        {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(werr)?;
            f.write_all(text.as_bytes()).map_err(werr)?;
            f.sync_all().map_err(werr)?;
        }
        fs::rename(&tmp, &path).map_err(werr)?;
        if let Ok(dir) = fs::File::open(state_dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    /// The keys in `role`.
    pub fn keys(&self, role: KeyRole) -> Vec<&NodeKey> {
        match role {
            KeyRole::Current => vec![&self.current],
            KeyRole::Next => self.next.iter().collect(),
            KeyRole::Previous => self.previous.iter().map(|(k, _)| k).collect(),
        }
    }

    /// The device's keys in this state: (initiating key, answered-only keys), as bytes.
    pub fn device_keys(&self) -> (Key, Vec<Key>) {
        let (primary, extras) = rotation::device_keys(self.phase, !self.previous.is_empty());
        let primary = self
            .keys(primary)
            .first()
            .copied()
            .unwrap_or(&self.current)
            .secret_bytes();
        let extras = extras
            .into_iter()
            .flat_map(|r| self.keys(r))
            .map(NodeKey::secret_bytes)
            .collect();
        (primary, extras)
    }
}

/// A 32-byte key.
pub type Key = [u8; 32];

fn parse_secret(
    text: &str,
    what: &str,
    malformed: &dyn Fn(&str) -> KeyFileError,
) -> Result<StaticSecret, KeyFileError> {
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|_| malformed(&format!("{what} is not base64")))?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| malformed(&format!("{what} is not 32 bytes")))?;
    Ok(StaticSecret::from(bytes))
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
        assert_eq!(k1.secret_bytes(), k2.secret_bytes());
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
        let private = STANDARD.encode(key.secret_bytes());
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
        assert_eq!(primary, next.secret_bytes());
        assert_eq!(extras, vec![back.current.secret_bytes()]);
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
            STANDARD.encode(back.current.secret_bytes())
        );
        let parsed = parse(Path::new("k"), &legacy).expect("legacy");
        assert_eq!(parsed.phase, Phase::Steady { generation: 0 });
        assert!(parsed.next.is_none() && parsed.previous.is_empty());
        // A phase without its next key is refused, not guessed at.
        let broken = format!(
            r#"{{"privateKey":"{}","createdAt":1,"generation":0,"phase":{{"name":"switched","since":1}}}}"#,
            STANDARD.encode(back.current.secret_bytes())
        );
        assert!(matches!(
            parse(Path::new("k"), &broken),
            Err(KeyFileError::Malformed { .. })
        ));
        fs::remove_dir_all(&dir).ok();
    }
}
