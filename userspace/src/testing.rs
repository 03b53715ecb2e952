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
