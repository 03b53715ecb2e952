//! Message boundaries for the policy hook: unlike the relay's
//! [`Scanner`](crate::protocol::postgres::frame::Scanner), which only
//! watches bytes go by, this framer hands over whole bodies of the message
//! types the hook rewrites, and raw slices of all others.

use crate::protocol::postgres::{frame::BadFrame, wire::MAX_MESSAGE};

/// Splits a byte stream into messages; collects the bodies of the kinds
/// asked for, passes the others through as raw slices.
#[derive(Default)]
pub(super) struct Framer {
    pub(super) header: [u8; 5],
    header_len: usize,
    kind: u8,
    remaining: usize,
    collecting: bool,
    pub(super) body: Vec<u8>,
}

pub(super) enum Piece<'a> {
    /// The header of a message that is not collected (in `framer.header`).
    Header,
    /// Body bytes of a message that is not collected.
    Raw(&'a [u8]),
    /// A collected message is complete: its body is in `framer.body`.
    Collected(u8),
    /// A message that was not collected ended.
    Passed(u8),
}

impl Framer {
    /// The next piece of `data` from `*at`, or `None` when it is used up.
    pub(super) fn next<'a>(
        &mut self,
        data: &'a [u8],
        at: &mut usize,
        collect: impl Fn(u8) -> bool,
    ) -> Result<Option<Piece<'a>>, BadFrame> {
        loop {
            if self.header_len < 5 {
                if *at >= data.len() {
                    return Ok(None);
                }
                let take = (5 - self.header_len).min(data.len() - *at);
                self.header[self.header_len..self.header_len + take]
                    .copy_from_slice(&data[*at..*at + take]);
                self.header_len += take;
                *at += take;
                if self.header_len < 5 {
                    return Ok(None);
                }
                let length = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                if !(4..=MAX_MESSAGE as u32).contains(&length) {
                    return Err(BadFrame {
                        kind: char::from(self.header[0]),
                        length,
                    });
                }
                self.kind = self.header[0];
                self.remaining = length as usize - 4;
                self.collecting = collect(self.kind);
                self.body.clear();
                if !self.collecting {
                    // The header bytes may span reads: hand them over from
                    // our copy, then the body straight from `data`.
                    return Ok(Some(Piece::Header));
                }
            }
            if self.remaining == 0 {
                self.header_len = 0;
                return Ok(Some(if self.collecting {
                    Piece::Collected(self.kind)
                } else {
                    Piece::Passed(self.kind)
                }));
            }
            if *at >= data.len() {
                return Ok(None);
            }
            let take = self.remaining.min(data.len() - *at);
            let chunk = &data[*at..*at + take];
            *at += take;
            self.remaining -= take;
            if self.collecting {
                self.body.extend_from_slice(chunk);
            } else {
                return Ok(Some(Piece::Raw(chunk)));
            }
        }
    }

    pub(super) fn at_boundary(&self) -> bool {
        self.header_len == 0
    }

    pub(super) fn shrink(&mut self) {
        if self.body.capacity() > 1 << 20 {
            self.body = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.push(kind);
        out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    /// Reassembles what the framer hands out, collecting only `C`.
    fn reframe(stream: &[u8], split: usize) -> (Vec<u8>, Vec<(u8, Vec<u8>)>) {
        let mut framer = Framer::default();
        let (mut raw, mut collected) = (Vec::new(), Vec::new());
        for part in [&stream[..split], &stream[split..]] {
            let mut at = 0;
            while let Some(piece) = framer.next(part, &mut at, |k| k == b'C').unwrap() {
                match piece {
                    Piece::Header => raw.extend_from_slice(&framer.header),
                    Piece::Raw(bytes) => raw.extend_from_slice(bytes),
                    Piece::Passed(_) => {}
                    Piece::Collected(kind) => {
                        collected.push((kind, framer.body.clone()));
                        raw.extend(msg(kind, &framer.body));
                    }
                }
            }
        }
        (raw, collected)
    }

    #[test]
    fn framing_survives_every_split() {
        let mut stream = msg(b'D', b"row-1");
        stream.extend(msg(b'C', b"SELECT 1\0"));
        stream.extend(msg(b'Z', b"I"));
        for split in 0..=stream.len() {
            let (raw, collected) = reframe(&stream, split);
            assert_eq!(raw, stream, "split at {split}");
            assert_eq!(collected, vec![(b'C', b"SELECT 1\0".to_vec())]);
        }
    }

    #[test]
    fn bad_lengths_end_the_session_without_panic() {
        let mut framer = Framer::default();
        let mut at = 0;
        assert!(framer.next(&[b'Q', 0, 0, 0, 1], &mut at, |_| true).is_err());
    }
}
