//! Files only their reader may read: upstream passwords, client keys, OIDC
//! client secrets. One that group or others can read is refused, so a
//! misconfigured permission fails closed instead of leaking the secret to
//! every local user (as ssh refuses an open private key).

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read secret file {path}: {source}; create it with mode 0600, owned by the user that reads it")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "secret file {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("secret file {path} is empty; write the secret into it")]
    Empty { path: PathBuf },
    #[error("secret file {path} is not UTF-8 text; write the secret into it as text")]
    NotText { path: PathBuf },
}

/// A secret kept as text (a password, a client secret): the file's
/// contents without the line end.
pub fn read_secret(path: &Path) -> Result<String, SecretError> {
    let text = String::from_utf8(read_private(path)?).map_err(|_| SecretError::NotText {
        path: path.to_owned(),
    })?;
    let secret = text.trim_end_matches(['\r', '\n']).to_string();
    if secret.is_empty() {
        return Err(SecretError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(secret)
}

/// A private file's bytes (a secret, a private key).
pub fn read_private(path: &Path) -> Result<Vec<u8>, SecretError> {
    let meta = std::fs::metadata(path).map_err(|source| SecretError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretError::TooOpen {
            path: path.to_owned(),
            mode,
        });
    }
    std::fs::read(path).map_err(|source| SecretError::Read {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_secret_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "hunter2\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_secret(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret(&path).unwrap(), "hunter2");
        std::fs::write(&path, b"\xff\xfe\n").unwrap();
        let err = read_secret(&path).unwrap_err().to_string();
        assert!(err.contains("is not UTF-8 text"), "{err}");
    }
}
