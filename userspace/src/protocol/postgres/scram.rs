//! The client half of SCRAM-SHA-256 (RFC 5802/7677), as PostgreSQL runs it:
//! the gateway proves it knows the upstream password without sending it,
//! and checks the server's signature so a fake upstream cannot pretend the
//! login succeeded.
//!
//! Over TLS the exchange is bound to the upstream's certificate
//! (`SCRAM-SHA-256-PLUS` with `tls-server-end-point`, RFC 5929): a man in the
//! middle holding another certificate cannot relay the login, even where
//! the resource's TLS is `require` (encrypted, certificate not verified).
//! When the upstream does not offer `-PLUS` on TLS the client says so
//! (`y,,`), which a server that does support binding refuses: a downgrade
//! is caught.
//!
//! The salted password (PBKDF2, 4,096 rounds by PostgreSQL's default: about
//! half a millisecond) is derived once per password, salt and round count
//! and kept in memory: every login to the same role asks for the same salt,
//! and a gateway whose clients connect per query (scripts, agents) would
//! otherwise spend most of its CPU on it. A new one is derived off the
//! event loop, which serves other sessions meanwhile.

use std::{
    collections::HashMap,
    sync::{LazyLock, Mutex},
};

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::lock;

type HmacSha256 = Hmac<Sha256>;

/// Salted passwords kept; the cache starts afresh when full (rotated
/// passwords and dropped roles leave entries behind).
const SALTED_ENTRIES: usize = 1024;

/// Salted passwords by [`salted_key`].
static SALTED: LazyLock<Mutex<HashMap<[u8; 32], [u8; 32]>>> = LazyLock::new(Mutex::default);

#[derive(Debug, thiserror::Error)]
pub enum ScramError {
    #[error("the upstream's SCRAM message is malformed: {0}")]
    Malformed(&'static str),
    #[error("the upstream's SCRAM nonce does not extend ours (possible man in the middle)")]
    Nonce,
    #[error("the upstream's SCRAM signature is wrong: it does not know the password (possible impostor)")]
    ServerSignature,
    #[error("the upstream asked for {0} PBKDF2 iterations; refusing more than 10,000,000")]
    Iterations(u32),
}

/// A SCRAM exchange in progress.
pub struct Scram {
    password: Vec<u8>,
    client_nonce: String,
    client_first_bare: String,
    binding: Binding,
    server_signature: Option<[u8; 32]>,
}

pub const MECHANISM: &str = "SCRAM-SHA-256";
pub const MECHANISM_PLUS: &str = "SCRAM-SHA-256-PLUS";

/// What the exchange says about channel binding (the GS2 header).
pub enum Binding {
    /// Plain TCP: `n,,`.
    None,
    /// TLS, but the server offered no `-PLUS`: `y,,`.
    Unused,
    /// TLS with `tls-server-end-point`: the hash of the server's
    /// certificate (see [`certificate_hash`]).
    ServerEndPoint(Vec<u8>),
}

impl Binding {
    fn gs2_header(&self) -> &'static str {
        match self {
            Binding::None => "n,,",
            Binding::Unused => "y,,",
            Binding::ServerEndPoint(_) => "p=tls-server-end-point,,",
        }
    }

    /// The mechanism to name in SASLInitialResponse.
    pub fn mechanism(&self) -> &'static str {
        match self {
            Binding::ServerEndPoint(_) => MECHANISM_PLUS,
            _ => MECHANISM,
        }
    }
}

/// RFC 5929 `tls-server-end-point` data: the certificate hashed with its
/// signature's hash, SHA-256 for MD5, SHA-1 and SHA-256. `None` for
/// signatures without a single hash (Ed25519) or unknown ones, which cannot
/// be bound.
pub fn certificate_hash(der: &[u8]) -> Option<Vec<u8>> {
    use sha2::{Sha384, Sha512};
    // DER of the signature algorithm OIDs, looked for in the certificate.
    const SHA384: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c], // sha384WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],       // ecdsa-with-SHA384
    ];
    const SHA512: [&[u8]; 2] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d], // sha512WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],       // ecdsa-with-SHA512
    ];
    const SHA256_OR_WEAKER: [&[u8]; 5] = [
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b], // sha256WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02],       // ecdsa-with-SHA256
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05], // sha1WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x04], // md5WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01],             // ecdsa-with-SHA1
    ];
    let has = |oids: &[&[u8]]| {
        oids.iter()
            .any(|oid| der.windows(oid.len()).any(|w| w == *oid))
    };
    if has(&SHA512) {
        Some(Sha512::digest(der).to_vec())
    } else if has(&SHA384) {
        Some(Sha384::digest(der).to_vec())
    } else if has(&SHA256_OR_WEAKER) {
        Some(Sha256::digest(der).to_vec())
    } else {
        None
    }
}

impl Scram {
    /// Starts an exchange; `nonce` must be fresh random printable text.
    pub fn new(password: &str, nonce: String, binding: Binding) -> Self {
        Self {
            password: password.as_bytes().to_vec(),
            client_first_bare: format!("n=,r={nonce}"),
            client_nonce: nonce,
            binding,
            server_signature: None,
        }
    }

    /// The mechanism this exchange uses.
    pub fn mechanism(&self) -> &'static str {
        self.binding.mechanism()
    }

    /// The client-first-message (SASLInitialResponse data).
    pub fn client_first(&self) -> String {
        format!("{}{}", self.binding.gs2_header(), self.client_first_bare)
    }

    /// Answers server-first-message with client-final-message.
    pub async fn client_final(&mut self, server_first: &[u8]) -> Result<String, ScramError> {
        let server_first =
            std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for part in server_first.split(',') {
            match part.split_once('=') {
                Some(("r", v)) => nonce = Some(v),
                Some(("s", v)) => salt = Some(v),
                Some(("i", v)) => iterations = Some(v),
                _ => {}
            }
        }
        let nonce = nonce.ok_or(ScramError::Malformed("no nonce"))?;
        if !nonce.starts_with(&self.client_nonce) || nonce.len() == self.client_nonce.len() {
            return Err(ScramError::Nonce);
        }
        let salt = B64
            .decode(salt.ok_or(ScramError::Malformed("no salt"))?)
            .map_err(|_| ScramError::Malformed("salt is not base64"))?;
        let iterations: u32 = iterations
            .ok_or(ScramError::Malformed("no iteration count"))?
            .parse()
            .map_err(|_| ScramError::Malformed("iteration count is not a number"))?;
        if iterations == 0 {
            return Err(ScramError::Malformed("zero iterations"));
        }
        if iterations > 10_000_000 {
            return Err(ScramError::Iterations(iterations));
        }
        let salted = salted_password(&self.password, &salt, iterations).await;
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        // c= is the GS2 header, followed by the binding data if any.
        let mut channel = self.binding.gs2_header().as_bytes().to_vec();
        if let Binding::ServerEndPoint(hash) = &self.binding {
            channel.extend_from_slice(hash);
        }
        let without_proof = format!("c={},r={nonce}", B64.encode(channel));
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let client_signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(client_signature)
            .map(|(k, s)| k ^ s)
            .collect();
        let server_key = hmac(&salted, b"Server Key");
        self.server_signature = Some(hmac(&server_key, auth_message.as_bytes()));
        Ok(format!("{without_proof},p={}", B64.encode(proof)))
    }

    /// Checks server-final-message.
    pub fn verify_final(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let text =
            std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let signature = text
            .split(',')
            .find_map(|p| p.strip_prefix("v="))
            .ok_or(ScramError::Malformed("no server signature"))?;
        let signature = B64
            .decode(signature)
            .map_err(|_| ScramError::Malformed("signature is not base64"))?;
        match self.server_signature {
            Some(expected) if expected[..] == signature[..] => Ok(()),
            _ => Err(ScramError::ServerSignature),
        }
    }
}

/// Hi(password, salt, iterations), from the cache or derived on a blocking
/// thread: an upstream may ask for up to 10,000,000 rounds.
async fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let key = salted_key(password, salt, iterations);
    let cached = lock(&SALTED).get(&key).copied();
    if let Some(salted) = cached {
        return salted;
    }
    let (owned_password, owned_salt) = (password.to_vec(), salt.to_vec());
    let derived =
        tokio::task::spawn_blocking(move || hi(&owned_password, &owned_salt, iterations)).await;
    // Only a runtime shutting down fails the blocking task: derive here.
    let salted = derived.unwrap_or_else(|_| hi(password, salt, iterations));
    let mut cache = lock(&SALTED);
    if cache.len() >= SALTED_ENTRIES {
        cache.clear();
    }
    cache.insert(key, salted);
    salted
}

/// The cache's key: a hash of the three inputs, each length-prefixed.
fn salted_key(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in [password, salt] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hasher.update(iterations.to_be_bytes());
    hasher.finalize().into()
}

/// HMAC-SHA-256 keyed with `key`.
fn keyed(key: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length: new_from_slice cannot fail.
    match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = keyed(key);
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// PBKDF2-HMAC-SHA-256 with one output block (RFC 5802's Hi()). The
/// keyed HMAC state is set up once and cloned per round: half the SHA-256
/// blocks of keying every round afresh.
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let keyed = keyed(password);
    let mut round = keyed.clone();
    round.update(salt);
    round.update(&1u32.to_be_bytes());
    let mut u: [u8; 32] = round.finalize().into_bytes().into();
    let mut out = u;
    for _ in 1..iterations {
        let mut round = keyed.clone();
        round.update(&u);
        u = round.finalize().into_bytes().into();
        for (o, x) in out.iter_mut().zip(u) {
            *o ^= x;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677's SCRAM-SHA-256 example (user "user", password "pencil").
    #[tokio::test]
    async fn rfc7677_vector() {
        let mut s = Scram::new("pencil", "rOprNGfwEbeRWgbNEkqO".into(), Binding::None);
        // RFC 7677 uses n=user; PostgreSQL's n= is empty, so rebuild the
        // bare message the RFC signs.
        s.client_first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO".into();
        let server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let fin = s.client_final(server_first).await.unwrap();
        assert_eq!(
            fin,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        s.verify_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap();
        assert!(s.verify_final(b"v=AAAA").is_err());
    }

    #[tokio::test]
    async fn bound_exchanges_carry_the_certificate_hash() {
        let hash = vec![7u8; 32];
        let s = Scram::new("pw", "abc".into(), Binding::ServerEndPoint(hash.clone()));
        assert_eq!(s.mechanism(), MECHANISM_PLUS);
        assert_eq!(s.client_first(), "p=tls-server-end-point,,n=,r=abc");
        let mut s = s;
        let reply = s.client_final(b"r=abcdef,s=c2FsdA==,i=4096").await.unwrap();
        let mut expected = b"p=tls-server-end-point,,".to_vec();
        expected.extend_from_slice(&hash);
        assert!(reply.starts_with(&format!("c={},r=abcdef,p=", B64.encode(expected))));

        let mut s = Scram::new("pw", "abc".into(), Binding::Unused);
        assert_eq!(s.client_first(), "y,,n=,r=abc");
        let reply = s.client_final(b"r=abcdef,s=c2FsdA==,i=4096").await.unwrap();
        assert!(reply.starts_with("c=eSws,"), "{reply}");
    }

    #[test]
    fn certificate_hash_follows_the_signature_hash() {
        let ecdsa_sha256 = [0x30, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02, 0x00];
        assert_eq!(certificate_hash(&ecdsa_sha256).unwrap().len(), 32);
        let rsa_sha384 = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c];
        assert_eq!(certificate_hash(&rsa_sha384).unwrap().len(), 48);
        assert_eq!(certificate_hash(b"ed25519 has no single hash"), None);
    }

    #[tokio::test]
    async fn salted_passwords_are_cached_by_all_three_inputs() {
        let salted = salted_password(b"pw", b"salt", 4096).await;
        assert_eq!(salted, hi(b"pw", b"salt", 4096));
        assert!(SALTED
            .lock()
            .unwrap()
            .contains_key(&salted_key(b"pw", b"salt", 4096)));
        assert_eq!(salted_password(b"pw", b"salt", 4096).await, salted);
        let others: [(&[u8], &[u8], u32); 3] = [
            (b"pw2", b"salt", 4096),
            (b"pw", b"salt2", 4096),
            (b"pw", b"salt", 4097),
        ];
        for (password, salt, iterations) in others {
            assert_ne!(salted_password(password, salt, iterations).await, salted);
        }
        // Length prefixes keep ("ab", "c") apart from ("a", "bc").
        assert_ne!(salted_key(b"ab", b"c", 1), salted_key(b"a", b"bc", 1));
    }

    #[tokio::test]
    async fn foreign_nonce_is_refused() {
        let mut s = Scram::new("pw", "abc".into(), Binding::None);
        assert!(matches!(
            s.client_final(b"r=xyz123,s=AAAA,i=4096").await,
            Err(ScramError::Nonce)
        ));
        assert!(s.client_final(b"garbage").await.is_err());
    }
}
