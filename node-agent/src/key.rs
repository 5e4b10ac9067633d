//! The node's WireGuard key: generated once from the OS RNG, kept in the agent's state
//! directory in a file of mode 0600, reused across restarts.
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

/// The key file's contents.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyFile {
    private_key: String,
    /// Seconds since the Unix epoch.
    created_at: u64,
    generation: i64,
}

/// The node's key pair.
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

    /// The private key's bytes, for configuring the device in-process.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.secret.to_bytes()
    }

    /// Loads the key from `state_dir`, or generates and stores one if there is none.
    /// Returns the key and whether it was generated now.
    pub fn load_or_generate(
        state_dir: &Path,
        now: SystemTime,
    ) -> Result<(NodeKey, bool), KeyFileError> {
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
                let key = NodeKey::generate(now, 0);
                key.store(state_dir)?;
                Ok((key, true))
            }
            Err(source) => Err(KeyFileError::Read { path, source }),
        }
    }

    /// Writes the key atomically: a 0600 temporary file, fsynced, renamed over the old one.
    pub fn store(&self, state_dir: &Path) -> Result<(), KeyFileError> {
        let path = state_dir.join(KEY_FILE);
        let werr = |source| KeyFileError::Write {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(state_dir).map_err(werr)?;
        let body = KeyFile {
            private_key: STANDARD.encode(self.secret.to_bytes()),
            created_at: self
                .created_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            generation: self.generation,
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
}

fn parse(path: &Path, text: &str) -> Result<NodeKey, KeyFileError> {
    let malformed = |reason: &str| KeyFileError::Malformed {
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    let file: KeyFile = serde_json::from_str(text).map_err(|e| malformed(&e.to_string()))?;
    let bytes = STANDARD
        .decode(file.private_key.trim())
        .map_err(|_| malformed("privateKey is not base64"))?;
    let bytes: [u8; 32] = bytes
        .try_into()
        .map_err(|_| malformed("privateKey is not 32 bytes"))?;
    let secret = StaticSecret::from(bytes);
    Ok(NodeKey {
        public: PublicKey::from(&secret),
        secret,
        created_at: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(file.created_at),
        generation: file.generation,
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
        let (k1, fresh) = NodeKey::load_or_generate(&dir, SystemTime::now()).expect("generate");
        assert!(fresh);
        let mode = fs::metadata(dir.join(KEY_FILE))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let (k2, fresh) = NodeKey::load_or_generate(&dir, SystemTime::now()).expect("load");
        assert!(!fresh);
        assert_eq!(k1.public_base64(), k2.public_base64());
        assert_eq!(k1.secret_bytes(), k2.secret_bytes());
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_world_readable_key_file_is_refused() {
        let dir = tempdir();
        NodeKey::load_or_generate(&dir, SystemTime::now()).expect("generate");
        fs::set_permissions(dir.join(KEY_FILE), fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = NodeKey::load_or_generate(&dir, SystemTime::now()).expect_err("must refuse");
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
}
