//! A node's static X25519 key pair: created at first start, kept in the state dir (mode 0600),
//! written as WireGuard writes keys (base64 of the 32 bytes).

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use boringtun::x25519::{PublicKey, StaticSecret};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{0} is not a WireGuard key (base64 of 32 bytes)")]
    Format(String),
    #[error("{path} is readable by others (mode {mode:o}); a private key must be 0600")]
    Permissions { path: String, mode: u32 },
}

/// A static key pair.
#[derive(Clone)]
pub struct KeyPair {
    pub secret: StaticSecret,
    pub public: PublicKey,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("KeyPair")
            .field("public", &encode(&self.public))
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// A fresh random key pair.
    pub fn generate() -> Self {
        let secret = StaticSecret::from(rand::random::<[u8; 32]>());
        let public = PublicKey::from(&secret);
        Self { secret, public }
    }

    /// The key pair in `path`, or a new one written there (0600, atomically) if there is none.
    /// A key file that others can read is refused rather than used.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        match fs::read_to_string(path) {
            Ok(text) => {
                let mode = fs::metadata(path)
                    .map_err(io("reading", path))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(KeyError::Permissions {
                        path: path.display().to_string(),
                        mode: mode & 0o777,
                    });
                }
                let secret = StaticSecret::from(decode(text.trim())?);
                let public = PublicKey::from(&secret);
                Ok(Self { secret, public })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let pair = Self::generate();
                pair.save(path)?;
                Ok(pair)
            }
            Err(e) => Err(io("reading", path)(e)),
        }
    }

    /// Writes the private key to `path` (0600 from the moment it exists, then renamed over
    /// any previous one).
    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        let tmp = path.with_extension("tmp");
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        writeln!(f, "{}", STANDARD.encode(self.secret.to_bytes())).map_err(io("writing", &tmp))?;
        f.sync_all().map_err(io("writing", &tmp))?;
        fs::rename(&tmp, path).map_err(io("renaming to", path))
    }
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> KeyError {
    let path = path.display().to_string();
    move |source| KeyError::Io { op, path, source }
}

/// A public key as WireGuard prints it.
pub fn encode(key: &PublicKey) -> String {
    STANDARD.encode(key.as_bytes())
}

/// The 32 bytes of a base64 key.
pub fn decode(text: &str) -> Result<[u8; 32], KeyError> {
    let bytes = STANDARD
        .decode(text)
        .map_err(|_| KeyError::Format(text.chars().take(8).collect::<String>() + "..."))?;
    bytes
        .try_into()
        .map_err(|_| KeyError::Format(text.chars().take(8).collect::<String>() + "..."))
}

/// A public key from its base64 form.
pub fn parse_public(text: &str) -> Result<PublicKey, KeyError> {
    decode(text).map(PublicKey::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_kept_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wireguard.key");
        let a = KeyPair::load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = KeyPair::load_or_create(&path).unwrap();
        assert_eq!(
            a.public.as_bytes(),
            b.public.as_bytes(),
            "kept across restarts"
        );
        let text = encode(&a.public);
        assert_eq!(text.len(), 44);
        assert_eq!(parse_public(&text).unwrap().as_bytes(), a.public.as_bytes());
        assert!(parse_public("not a key").is_err());
        assert!(!format!("{a:?}").contains(&STANDARD.encode(a.secret.to_bytes())));
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            KeyPair::load_or_create(&path),
            Err(KeyError::Permissions { .. })
        ));
    }
}
