//! One link of the hash chain, and the signed checkpoints over it.
//!
//! A record's hash covers its sequence number, its time, the previous
//! record's hash and the hash of its payload, not the payload itself: a
//! retention purge can then drop an expired payload and keep its hash, and
//! the chain still verifies. Editing a payload breaks its payload hash;
//! editing, deleting or reordering a record breaks the links after it;
//! cutting off the end is caught by the last signed [`Checkpoint`].

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// The `prev` of the first record.
pub const GENESIS: Hash = [0; 32];

const RECORD_DOMAIN: &[u8] = b"portcullis-audit-record-v1\0";
const CHECKPOINT_DOMAIN: &[u8] = b"portcullis-audit-checkpoint-v1\0";

/// One event in the chain, as stored (JSON, keyed by `seq` big-endian) and
/// as exported.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    /// Position in the chain, from 1, without gaps.
    pub seq: u64,
    /// When the event was recorded, in microseconds since the Unix epoch.
    pub at_us: u64,
    #[serde(with = "hex_bytes")]
    pub prev: Hash,
    #[serde(with = "hex_bytes")]
    pub payload_hash: Hash,
    #[serde(with = "hex_bytes")]
    pub hash: Hash,
    /// The event as JSON, byte for byte as hashed; absent once purged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Box<RawValue>>,
    /// The seq of the `retention_purge` record that removed the payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purged_by: Option<u64>,
}

impl Record {
    /// Builds the record that follows `prev` (its hash) for `payload`.
    pub fn new(seq: u64, at_us: u64, prev: Hash, payload: Box<RawValue>) -> Self {
        let payload_hash = payload_hash(payload.get());
        Self {
            seq,
            at_us,
            prev,
            payload_hash,
            hash: chain_hash(seq, at_us, &prev, &payload_hash),
            payload: Some(payload),
            purged_by: None,
        }
    }

    /// The hash this record's header should have.
    pub fn expected_hash(&self) -> Hash {
        chain_hash(self.seq, self.at_us, &self.prev, &self.payload_hash)
    }

    /// The payload as a JSON value, if still present and well-formed.
    pub fn event(&self) -> Option<serde_json::Map<String, serde_json::Value>> {
        self.payload
            .as_ref()
            .and_then(|p| serde_json::from_str(p.get()).ok())
    }

    /// The stored form: compact JSON, byte for byte what
    /// `serde_json::to_vec` makes of the struct, but written directly. The
    /// hashes are hex and the payload is JSON already, so nothing needs the
    /// escape scan that serde runs over every string (a third of the
    /// writer's encoding time went to scanning the three hex strings).
    pub fn encode(&self) -> Vec<u8> {
        encode(
            self.seq,
            self.at_us,
            [&self.prev, &self.payload_hash, &self.hash],
            self.payload.as_deref().map(RawValue::get),
            self.purged_by,
        )
    }

    /// The hash and stored form of the record that follows `prev` for
    /// `payload`, the event's JSON text: what the writer appends, without
    /// turning text it wrote itself into a [`RawValue`] (which parses it).
    pub fn encode_new(seq: u64, at_us: u64, prev: Hash, payload: &str) -> (Hash, Vec<u8>) {
        let payload_hash = payload_hash(payload);
        let hash = chain_hash(seq, at_us, &prev, &payload_hash);
        let bytes = encode(
            seq,
            at_us,
            [&prev, &payload_hash, &hash],
            Some(payload),
            None,
        );
        (hash, bytes)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// A record's stored form from its fields; `hashes` are `prev`,
/// `payload_hash` and `hash`, in the struct's order.
fn encode(
    seq: u64,
    at_us: u64,
    hashes: [&Hash; 3],
    payload: Option<&str>,
    purged_by: Option<u64>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + payload.map_or(0, str::len));
    let mut number = itoa::Buffer::new();
    out.extend_from_slice(b"{\"seq\":");
    out.extend_from_slice(number.format(seq).as_bytes());
    out.extend_from_slice(b",\"at_us\":");
    out.extend_from_slice(number.format(at_us).as_bytes());
    for (name, hash) in [
        &b",\"prev\":\""[..],
        b"\",\"payload_hash\":\"",
        b"\",\"hash\":\"",
    ]
    .into_iter()
    .zip(hashes)
    {
        out.extend_from_slice(name);
        hex_bytes::write(hash, &mut out);
    }
    out.push(b'"');
    if let Some(payload) = payload {
        out.extend_from_slice(b",\"payload\":");
        out.extend_from_slice(payload.as_bytes());
    }
    if let Some(purged_by) = purged_by {
        out.extend_from_slice(b",\"purged_by\":");
        out.extend_from_slice(number.format(purged_by).as_bytes());
    }
    out.push(b'}');
    out
}

pub fn payload_hash(payload: &str) -> Hash {
    Sha256::digest(payload.as_bytes()).into()
}

fn chain_hash(seq: u64, at_us: u64, prev: &Hash, payload_hash: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update(RECORD_DOMAIN);
    h.update(seq.to_be_bytes());
    h.update(at_us.to_be_bytes());
    h.update(prev);
    h.update(payload_hash);
    h.finalize().into()
}

/// A signed statement "the chain had `seq` records ending in `hash` at
/// `at_us`", numbered from 1 without gaps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub number: u64,
    pub seq: u64,
    #[serde(with = "hex_bytes")]
    pub hash: Hash,
    pub at_us: u64,
    #[serde(with = "hex_bytes")]
    pub public_key: [u8; 32],
    #[serde(with = "hex_bytes")]
    pub signature: [u8; 64],
}

impl Checkpoint {
    pub fn sign(key: &SigningKey, number: u64, seq: u64, hash: Hash, at_us: u64) -> Self {
        let signature = key.sign(&checkpoint_message(number, seq, &hash, at_us));
        Self {
            number,
            seq,
            hash,
            at_us,
            public_key: key.verifying_key().to_bytes(),
            signature: signature.to_bytes(),
        }
    }

    /// True if `key` signed exactly these fields.
    pub fn signature_valid(&self, key: &VerifyingKey) -> bool {
        let message = checkpoint_message(self.number, self.seq, &self.hash, self.at_us);
        key.verify(&message, &Signature::from_bytes(&self.signature))
            .is_ok()
    }
}

fn checkpoint_message(number: u64, seq: u64, hash: &Hash, at_us: u64) -> Vec<u8> {
    let mut m = Vec::with_capacity(CHECKPOINT_DOMAIN.len() + 56);
    m.extend_from_slice(CHECKPOINT_DOMAIN);
    m.extend_from_slice(&number.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(hash);
    m.extend_from_slice(&at_us.to_be_bytes());
    m
}

/// Fixed-size byte arrays as lower-case hex in JSON.
pub mod hex_bytes {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    /// Appends a hash as lower-case hex: formatted on the stack, then
    /// copied once (pushing digit by digit showed in the writer's profile).
    pub fn write(v: &[u8; 32], out: &mut Vec<u8>) {
        let mut text = [0u8; 64];
        hex_into(v, &mut text);
        out.extend_from_slice(&text);
    }

    /// Hex into a stack buffer rather than `hex::encode`'s `String`: export
    /// serialises three hashes per record.
    pub fn serialize<S: Serializer, const N: usize>(v: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
        let mut text = [0u8; 128];
        let text = text
            .get_mut(..2 * N)
            .ok_or_else(|| serde::ser::Error::custom("hex field longer than 64 bytes"))?;
        hex_into(v, text);
        // Only ASCII digits were written.
        s.serialize_str(std::str::from_utf8(text).map_err(serde::ser::Error::custom)?)
    }

    /// Writes `v` as lower-case hex into `text`, two digits per byte.
    fn hex_into(v: &[u8], text: &mut [u8]) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for (pair, byte) in text.chunks_exact_mut(2).zip(v) {
            pair[0] = DIGITS[usize::from(byte >> 4)];
            pair[1] = DIGITS[usize::from(byte & 0xf)];
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        d: D,
    ) -> Result<[u8; N], D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let mut out = [0u8; N];
        hex::decode_to_slice(text.as_bytes(), &mut out).map_err(D::Error::custom)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> Box<RawValue> {
        RawValue::from_string(text.to_string()).unwrap()
    }

    #[test]
    fn encode_writes_what_serde_would() {
        let mut r = Record::new(42, 1_700_000_000_123_456, [0xa5; 32], raw(r#"{"a":"\n"}"#));
        assert_eq!(r.encode(), serde_json::to_vec(&r).unwrap());
        r.payload = None;
        r.purged_by = Some(u64::MAX);
        assert_eq!(r.encode(), serde_json::to_vec(&r).unwrap());
    }

    #[test]
    fn encode_new_is_new_then_encode() {
        let payload = r#"{"event":"x","a":"\u0001"}"#;
        let r = Record::new(9, 11, [3; 32], raw(payload));
        assert_eq!(
            Record::encode_new(9, 11, [3; 32], payload),
            (r.hash, r.encode())
        );
    }

    #[test]
    fn round_trip_keeps_payload_bytes_and_hash() {
        let r = Record::new(1, 7, GENESIS, raw(r#"{"event":"x","a":  1}"#));
        let back = Record::decode(&r.encode()).unwrap();
        assert_eq!(
            back.payload.as_ref().unwrap().get(),
            r#"{"event":"x","a":  1}"#
        );
        assert_eq!(payload_hash(back.payload.unwrap().get()), r.payload_hash);
        assert_eq!(back.hash, r.expected_hash());
    }

    #[test]
    fn checkpoint_signature_covers_every_field() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let cp = Checkpoint::sign(&key, 1, 10, [1; 32], 99);
        assert!(cp.signature_valid(&key.verifying_key()));
        let mut forged = cp.clone();
        forged.seq = 11;
        assert!(!forged.signature_valid(&key.verifying_key()));
    }
}
