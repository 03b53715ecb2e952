//! The two secrets of the audit store, each a 32-byte file (hex) in the
//! state directory, readable by root only:
//!
//! * `audit-signing.key`: the ed25519 key that signs checkpoints. Auditors
//!   get its public half (`portcullis audit public-key`) and keep it
//!   elsewhere, so that a rewritten store cannot be re-signed unnoticed.
//! * `audit-subject.key`: the HMAC key for the data-subject index. Without
//!   it the index is a set of keyed hashes that cannot be reversed by
//!   hashing guesses (e-mail addresses are easy to guess).
//!
//! `cargo xtask install` creates both with `portcullis audit init-keys`
//! ([`init`]), which never replaces an existing key. A daemon that finds
//! them missing creates them too, and warns that they were not made at
//! install (the public key was then never handed to auditors).

use std::{
    fs::{File, OpenOptions},
    io::{Read, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use ed25519_dalek::{SigningKey, VerifyingKey};

use super::AuditError;

pub const SIGNING_KEY_FILE: &str = "audit-signing.key";
pub const SUBJECT_KEY_FILE: &str = "audit-subject.key";

/// The store's secrets.
pub struct Keys {
    pub signing: SigningKey,
    pub subject: [u8; 32],
}

impl Keys {
    /// Loads both keys, creating missing ones (first start, or install).
    pub fn load_or_create(state_dir: &Path) -> Result<Self, AuditError> {
        Ok(Self {
            signing: SigningKey::from_bytes(&load_or_create(&state_dir.join(SIGNING_KEY_FILE))?),
            subject: load_or_create(&state_dir.join(SUBJECT_KEY_FILE))?,
        })
    }
}

/// Creates whichever of the two keys is missing (mode 0600), never
/// replacing one; returns the paths it created.
///
/// # Errors
/// An existing key that cannot be read, is damaged or readable by others.
pub fn init(state_dir: &Path) -> Result<Vec<PathBuf>, AuditError> {
    let mut created = Vec::new();
    for name in [SIGNING_KEY_FILE, SUBJECT_KEY_FILE] {
        let path = state_dir.join(name);
        match read_key(&path) {
            Ok(_) => {}
            Err(AuditError::Key { message, .. }) if message == NOT_FOUND => {
                create_key(&path)?;
                created.push(path);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(created)
}

/// The public key auditors verify checkpoints with.
pub fn public_key(state_dir: &Path) -> Result<VerifyingKey, AuditError> {
    let secret = read_key(&state_dir.join(SIGNING_KEY_FILE))?;
    Ok(SigningKey::from_bytes(&secret).verifying_key())
}

/// The subject-index key, for look-ups.
pub fn subject_key(state_dir: &Path) -> Result<[u8; 32], AuditError> {
    read_key(&state_dir.join(SUBJECT_KEY_FILE))
}

/// Parses a public key given as 64 hex digits.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, AuditError> {
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut bytes).map_err(|_| AuditError::Key {
        path: PathBuf::from("--public-key"),
        message: "expected 64 hex digits, as printed by `portcullis audit public-key`".into(),
    })?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| AuditError::Key {
        path: PathBuf::from("--public-key"),
        message: format!("not an ed25519 public key: {e}"),
    })
}

fn load_or_create(path: &Path) -> Result<[u8; 32], AuditError> {
    match read_key(path) {
        Err(AuditError::Key { message, .. }) if message == NOT_FOUND => create_key(path),
        other => other,
    }
}

const NOT_FOUND: &str = "missing";

fn read_key(path: &Path) -> Result<[u8; 32], AuditError> {
    let key_error = |message: String| AuditError::Key {
        path: path.to_owned(),
        message,
    };
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(key_error(NOT_FOUND.into()))
        }
        Err(e) => return Err(key_error(format!("cannot open: {e} (run as root)"))),
    };
    let mode = file
        .metadata()
        .map_err(|e| key_error(e.to_string()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(key_error(format!(
            "mode {:o} lets others read the key; run `chmod 600 {}` (and consider the key compromised)",
            mode & 0o777,
            path.display()
        )));
    }
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| key_error(e.to_string()))?;
    let mut key = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut key).map_err(|_| {
        key_error("not 64 hex digits: the file was damaged; restore it from backup".into())
    })?;
    Ok(key)
}

/// Writes a fresh random key atomically (temporary file, fsync, then a
/// hard link, which fails rather than replace a key another process made
/// meanwhile: that key is used instead).
fn create_key(path: &Path) -> Result<[u8; 32], AuditError> {
    let io = |e: std::io::Error| AuditError::Key {
        path: path.to_owned(),
        message: format!("cannot create: {e}"),
    };
    let mut key = [0u8; 32];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(io)?;
    let tmp = path.with_extension("key.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(format!("{}\n", hex::encode(key)).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return read_key(path),
        Err(e) => return Err(io(e)),
    }
    if let Some(dir) = path.parent() {
        File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_creates_missing_keys_once_and_never_replaces_them() {
        let dir = tempfile::tempdir().unwrap();
        let created = init(dir.path()).unwrap();
        assert_eq!(created.len(), 2);
        let public = public_key(dir.path()).unwrap();
        let subject = subject_key(dir.path()).unwrap();
        for path in &created {
            let mode = std::fs::metadata(path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", path.display());
        }
        assert!(init(dir.path()).unwrap().is_empty());
        assert_eq!(public_key(dir.path()).unwrap(), public);
        assert_eq!(subject_key(dir.path()).unwrap(), subject);
        std::fs::remove_file(dir.path().join(SUBJECT_KEY_FILE)).unwrap();
        assert_eq!(
            init(dir.path()).unwrap(),
            [dir.path().join(SUBJECT_KEY_FILE)]
        );
        assert_eq!(public_key(dir.path()).unwrap(), public);
        let keys = Keys::load_or_create(dir.path()).unwrap();
        assert_eq!(keys.signing.verifying_key(), public);
    }

    #[test]
    fn init_refuses_a_key_others_can_read() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        let path = dir.path().join(SIGNING_KEY_FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = init(dir.path()).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }
}
