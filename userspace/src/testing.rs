//! Helpers for unit tests.

use std::sync::Mutex;

use crate::audit::{Ack, AuditEvent, Recorder};

/// A recorder that keeps every event in memory, durable at once.
#[derive(Default)]
pub(crate) struct Collect(pub Mutex<Vec<AuditEvent>>);

impl Collect {
    /// Every event so far as JSON, one a line: for tests that look for a
    /// field in what was recorded.
    pub fn json(&self) -> String {
        let events = self.0.lock().unwrap();
        let lines: Vec<String> = events
            .iter()
            .map(|e| serde_json::to_string(e).unwrap())
            .collect();
        lines.join("\n")
    }
}

impl Recorder for Collect {
    fn record(&self, event: AuditEvent) -> Ack {
        self.0.lock().unwrap().push(event);
        Ack::done(Ok(()))
    }
}

/// A small seeded generator (xorshift64) for tests that throw random
/// input at parsers: the same seed gives the same input, so a failure
/// replays.
pub(crate) struct Random(u64);

impl Random {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (which must not be 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
        &from[self.below(from.len())]
    }

    /// `text` with a few random edits: bytes dropped, runs cut out or
    /// copied elsewhere, quotes, brackets, huge numbers and invalid UTF-8
    /// put in. Mostly still close to the original, so a parser gets past
    /// its first lines.
    pub fn mutate(&mut self, text: &str) -> String {
        const PIECES: &[&[u8]] = &[
            b"\"",
            b"'",
            b"[",
            b"]",
            b"{",
            b"}",
            b"=",
            b"\n",
            b"\\",
            b"$",
            b"-1",
            b"99999999999999999999",
            b"\xff",
            b"\0",
            b"*",
            b"(",
        ];
        let mut bytes = text.as_bytes().to_vec();
        for _ in 0..1 + self.below(6) {
            if bytes.is_empty() {
                break;
            }
            let at = self.below(bytes.len());
            let end = (at + self.below(40)).min(bytes.len());
            match self.below(4) {
                0 => drop(bytes.remove(at)),
                1 => drop(bytes.drain(at..end)),
                2 => {
                    let piece = *self.pick(PIECES);
                    bytes.splice(at..at, piece.iter().copied());
                }
                _ => {
                    let run = bytes[at..end].to_vec();
                    let to = self.below(bytes.len());
                    bytes.splice(to..to, run);
                }
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// A message body that parsers trip on: empty, truncated, lengths and
/// counts of -1 or 0x7fffffff, missing NULs, mixed with well-formed pieces
/// of PostgreSQL messages.
pub(crate) fn random_body(random: &mut Random) -> Vec<u8> {
    const PIECES: &[&[u8]] = &[
        b"\0",
        b"s1\0",
        b"select $1\0",
        b"select email, card_number from payments\0",
        b"copy payments to stdout\0",
        b"drop table t\0",
        b"\0\x01",
        b"\xff\xff",
        b"\x7f\xff\xff\xff",
        b"\xff\xff\xff\xff",
        b"\0\0\0\x04abcd",
        b"\0\x02\0\0\0\x01",
        b"\0\0\0\x11alice@example.com",
        b"SELECT 1\0",
        b"INSERT 0 3\0",
        b"COPY 12\0",
        b"S",
        b"P",
        b"I",
        b"E",
    ];
    let mut body = Vec::new();
    for _ in 0..random.below(6) {
        if random.below(3) == 0 {
            let len = random.below(9);
            body.extend((0..len).map(|_| random.next() as u8));
        } else {
            let piece: &&[u8] = random.pick(PIECES);
            body.extend_from_slice(piece);
        }
    }
    body
}
