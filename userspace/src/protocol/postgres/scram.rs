//! The client half of SCRAM-SHA-256 (RFC 5802/7677), as PostgreSQL runs it:
//! the gateway proves it knows the upstream password without sending it,
//! and checks the server's signature so a fake upstream cannot pretend the
//! login succeeded.
//!
//! No channel binding (`n,,`): the upstream's TLS, when used, is verified by
//! rustls itself.

use base64::{engine::general_purpose::STANDARD as B64, Engine};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

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
    server_signature: Option<[u8; 32]>,
}

pub const MECHANISM: &str = "SCRAM-SHA-256";

impl Scram {
    /// Starts an exchange; `nonce` must be fresh random printable text.
    pub fn new(password: &str, nonce: String) -> Self {
        Self {
            password: password.as_bytes().to_vec(),
            client_first_bare: format!("n=,r={nonce}"),
            client_nonce: nonce,
            server_signature: None,
        }
    }

    /// The client-first-message (SASLInitialResponse data).
    pub fn client_first(&self) -> String {
        format!("n,,{}", self.client_first_bare)
    }

    /// Answers server-first-message with client-final-message.
    pub fn client_final(&mut self, server_first: &[u8]) -> Result<String, ScramError> {
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
        let salted = hi(&self.password, &salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let without_proof = format!("c=biws,r={nonce}");
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

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length: new_from_slice cannot fail.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// PBKDF2-HMAC-SHA-256 with one output block (RFC 5802's Hi()).
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut block = salt.to_vec();
    block.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(password, &block);
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
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
    #[test]
    fn rfc7677_vector() {
        let mut s = Scram::new("pencil", "rOprNGfwEbeRWgbNEkqO".into());
        // RFC 7677 uses n=user; PostgreSQL's n= is empty, so rebuild the
        // bare message the RFC signs.
        s.client_first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO".into();
        let server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
        let fin = s.client_final(server_first).unwrap();
        assert_eq!(
            fin,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        s.verify_final(b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
            .unwrap();
        assert!(s.verify_final(b"v=AAAA").is_err());
    }

    #[test]
    fn foreign_nonce_is_refused() {
        let mut s = Scram::new("pw", "abc".into());
        assert!(matches!(
            s.client_final(b"r=xyz123,s=AAAA,i=4096"),
            Err(ScramError::Nonce)
        ));
        assert!(s.client_final(b"garbage").is_err());
    }
}
