//! Masking styles: what a value becomes once a rule decides to hide it.
//!
//! The pseudonym is an HMAC-SHA256 of the value under a key kept in the
//! state directory: the same input always gives the same token (so joins
//! and GROUP BY still work on masked output), but without the key nobody
//! can confirm a guess by hashing candidates, as they could with a plain
//! hash.

use std::{
    io::{Read, Write},
    os::unix::fs::OpenOptionsExt,
    path::Path,
};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::detect::{ALNUM, BYTE_CLASS};

/// What full redaction writes instead of the value.
pub const REDACTED: &[u8] = b"***";
/// Prefix of pseudonym tokens, so people can tell them from data.
const TOKEN_PREFIX: &[u8] = b"tok_";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// Replace the whole value with [`REDACTED`].
    Redact,
    /// Keep the last `keep_last` letters and digits, star the others;
    /// punctuation stays so the shape is recognisable.
    Partial { keep_last: usize },
    /// A deterministic keyed token.
    Pseudonym,
}

/// The pseudonym key, kept ready to clone (the keyed HMAC state, so each
/// token costs two SHA-256 compressions and no key schedule).
#[derive(Clone)]
pub struct PseudonymKey(Hmac<Sha256>);

impl std::fmt::Debug for PseudonymKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PseudonymKey(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "pseudonym key {path}: {source} (it lives in the state directory; check its permissions)"
    )]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("pseudonym key {0} is shorter than 32 bytes; remove it to have a new one generated (tokens will change)")]
    Short(String),
}

impl PseudonymKey {
    pub fn from_bytes(key: &[u8]) -> Self {
        // HMAC takes keys of any length; new_from_slice cannot fail.
        Self(Hmac::<Sha256>::new_from_slice(key).unwrap_or_else(|_| unreachable!()))
    }

    /// Loads the key at `path`, creating it (32 random bytes, mode 0600) if
    /// it does not exist yet.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyError> {
        let err = |source| KeyError::Io {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read(path) {
            Ok(bytes) if bytes.len() >= 32 => return Ok(Self::from_bytes(&bytes)),
            Ok(_) => return Err(KeyError::Short(path.display().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let mut key = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut key))
            .map_err(err)?;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(err)?;
        file.write_all(&key)
            .and_then(|()| file.sync_all())
            .map_err(err)?;
        Ok(Self::from_bytes(&key))
    }

    fn token(&self, value: &[u8], out: &mut Vec<u8>) {
        let mut mac = self.0.clone();
        mac.update(value);
        let digest = mac.finalize().into_bytes();
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut token = [0u8; 20];
        token[..4].copy_from_slice(TOKEN_PREFIX);
        for (i, b) in digest[..8].iter().enumerate() {
            token[4 + 2 * i] = HEX[usize::from(b >> 4)];
            token[5 + 2 * i] = HEX[usize::from(b & 0xf)];
        }
        out.extend_from_slice(&token);
    }
}

impl Style {
    /// Appends the masked form of `value` to `out`.
    pub fn apply(self, value: &[u8], key: &PseudonymKey, out: &mut Vec<u8>) {
        match self {
            Style::Redact => out.extend_from_slice(REDACTED),
            Style::Pseudonym => key.token(value, out),
            Style::Partial { keep_last } => partial(value, keep_last, out),
        }
    }
}

fn partial(value: &[u8], keep_last: usize, out: &mut Vec<u8>) {
    if value.is_ascii() {
        // The common case, without UTF-8 decoding: walk back over the
        // letters and digits kept, copy the value, star the letters and
        // digits before them in place.
        let alnum = |c: u8| BYTE_CLASS[usize::from(c)] & ALNUM != 0;
        let (mut kept, mut cut) = (0, value.len());
        while cut > 0 && kept < keep_last {
            cut -= 1;
            kept += usize::from(alnum(value[cut]));
        }
        let start = out.len();
        out.extend_from_slice(value);
        let mut starred = false;
        for c in &mut out[start..start + cut] {
            let hide = alnum(*c);
            starred |= hide;
            *c = if hide { b'*' } else { *c };
        }
        if keep_last > 0 && kept > 0 && !starred {
            // Keeping everything would reveal the value: hide it all.
            out[start..].fill(b'*');
        }
        return;
    }
    let Ok(text) = std::str::from_utf8(value) else {
        out.extend_from_slice(REDACTED);
        return;
    };
    let total = text.chars().filter(|c| c.is_alphanumeric()).count();
    let hide = total.saturating_sub(keep_last);
    if hide == 0 && total > 0 {
        // Keeping everything would reveal the value: hide it all instead.
        out.extend(std::iter::repeat_n(b'*', text.chars().count()));
        return;
    }
    let mut seen = 0;
    let mut buf = [0u8; 4];
    for c in text.chars() {
        if c.is_alphanumeric() {
            seen += 1;
            if seen <= hide {
                out.push(b'*');
                continue;
            }
        }
        out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(style: Style, value: &str) -> String {
        let mut out = Vec::new();
        style.apply(value.as_bytes(), &PseudonymKey::from_bytes(b"k"), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn partial_keeps_the_last_characters_and_the_shape() {
        let p = Style::Partial { keep_last: 4 };
        assert_eq!(masked(p, "4111-1111-1111-1234"), "****-****-****-1234");
        assert_eq!(masked(p, "+1 555 123 4567"), "+* *** *** 4567");
        assert_eq!(masked(p, "abc"), "***", "too short to keep anything");
        assert_eq!(masked(p, "ünïcödé1"), "****ödé1");
    }

    #[test]
    fn pseudonyms_are_deterministic_and_keyed() {
        let a = masked(Style::Pseudonym, "ann@example.com");
        assert_eq!(a, masked(Style::Pseudonym, "ann@example.com"));
        assert_ne!(a, masked(Style::Pseudonym, "bob@example.com"));
        assert!(a.starts_with("tok_") && a.len() == 20, "{a}");
        let mut other = Vec::new();
        Style::Pseudonym.apply(
            b"ann@example.com",
            &PseudonymKey::from_bytes(b"other key"),
            &mut other,
        );
        assert_ne!(a.as_bytes(), other);
    }

    #[test]
    fn key_file_is_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let k1 = PseudonymKey::load_or_create(&path).unwrap();
        let k2 = PseudonymKey::load_or_create(&path).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        Style::Pseudonym.apply(b"x", &k1, &mut a);
        Style::Pseudonym.apply(b"x", &k2, &mut b);
        assert_eq!(a, b);
        std::fs::write(&path, b"short").unwrap();
        assert!(PseudonymKey::load_or_create(&path).is_err());
    }

    #[test]
    fn partial_matches_the_plain_definition_on_ascii() {
        // Star all but the last `keep` letters and digits; if that would
        // keep them all, star the whole value.
        fn plain(value: &[u8], keep: usize) -> Vec<u8> {
            let total = value.iter().filter(|c| c.is_ascii_alphanumeric()).count();
            let hide = total.saturating_sub(keep);
            if hide == 0 && total > 0 {
                return vec![b'*'; value.len()];
            }
            let mut seen = 0;
            value
                .iter()
                .map(|&c| {
                    if c.is_ascii_alphanumeric() {
                        seen += 1;
                        if seen <= hide {
                            return b'*';
                        }
                    }
                    c
                })
                .collect()
        }
        let samples = [
            "",
            "-",
            "--",
            "a",
            "ab-cd",
            "1234",
            "12345",
            "4111 1111 1111 1111",
            "+1 555-123-4567",
            "x_y.z",
            "(555) 123-4567",
            "a-b-c-d-e-f",
        ];
        for value in samples {
            for keep in 0..7 {
                let mut out = b"prefix".to_vec();
                partial(value.as_bytes(), keep, &mut out);
                assert_eq!(
                    &out[6..],
                    plain(value.as_bytes(), keep),
                    "{value:?} keeping {keep}"
                );
            }
        }
    }
}
