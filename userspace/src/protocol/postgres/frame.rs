//! Finding message boundaries in a byte stream without holding it back.
//!
//! The relay forwards every chunk it reads as it is; the [`Scanner`] only
//! watches the chunk go by, reports each message's type when the message is
//! complete, and copies the bodies of the few message types the gateway
//! inspects (a statement's text, a command tag). A 1 GiB CopyData or a
//! million DataRows pass through with no copy and no per-message work beyond
//! reading a 5-byte header.

use super::wire::MAX_MESSAGE;

#[derive(Debug, thiserror::Error)]
#[error("invalid message length {length} for message type {kind:?}")]
pub struct BadFrame {
    pub kind: char,
    pub length: u32,
}

/// Tracks message boundaries across reads.
pub struct Scanner {
    header: [u8; 5],
    header_len: usize,
    kind: u8,
    remaining: usize,
    collecting: bool,
    body: Vec<u8>,
    inspect: fn(u8) -> bool,
}

impl Scanner {
    /// `inspect` says which message types need their body.
    pub fn new(inspect: fn(u8) -> bool) -> Self {
        Self {
            header: [0; 5],
            header_len: 0,
            kind: 0,
            remaining: 0,
            collecting: false,
            body: Vec::new(),
            inspect,
        }
    }

    /// Scans `data`, calling `on_message(kind, body)` for each message it
    /// completes; `body` is empty for message types not inspected.
    ///
    /// # Errors
    ///
    /// A length below 4 or above PostgreSQL's 1 GiB limit: the stream is not
    /// PostgreSQL (or is corrupt) and the session must end.
    pub fn feed(
        &mut self,
        mut data: &[u8],
        mut on_message: impl FnMut(u8, &[u8]),
    ) -> Result<(), BadFrame> {
        while !data.is_empty() {
            if self.header_len == 0 {
                // The usual case, a whole message in `data`: its body is
                // read where it lies, without a copy.
                if let Some(header) = data.first_chunk::<5>() {
                    let (kind, remaining) = Self::header(header)?;
                    if let Some(message) = data.get(..5 + remaining) {
                        let body = if (self.inspect)(kind) {
                            &message[5..]
                        } else {
                            &[]
                        };
                        on_message(kind, body);
                        data = &data[message.len()..];
                        continue;
                    }
                }
            }
            if self.header_len < 5 {
                let take = (5 - self.header_len).min(data.len());
                self.header[self.header_len..self.header_len + take].copy_from_slice(&data[..take]);
                self.header_len += take;
                data = &data[take..];
                if self.header_len < 5 {
                    break;
                }
                (self.kind, self.remaining) = Self::header(&self.header)?;
                self.collecting = (self.inspect)(self.kind);
                self.body.clear();
            }
            let take = self.remaining.min(data.len());
            if self.collecting {
                self.body.extend_from_slice(&data[..take]);
            }
            self.remaining -= take;
            data = &data[take..];
            if self.remaining == 0 {
                on_message(self.kind, &self.body);
                self.header_len = 0;
                if self.body.capacity() > 64 * 1024 {
                    // A huge statement once must not pin its buffer forever.
                    self.body = Vec::new();
                }
            }
        }
        Ok(())
    }

    /// A message's type and body length, from its 5-byte header.
    fn header(header: &[u8; 5]) -> Result<(u8, usize), BadFrame> {
        let [kind, length @ ..] = *header;
        let length = u32::from_be_bytes(length);
        if !(4..=MAX_MESSAGE as u32).contains(&length) {
            return Err(BadFrame {
                kind: char::from(kind),
                length,
            });
        }
        Ok((kind, length as usize - 4))
    }

    /// True between messages (nothing partial pending).
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![kind];
        v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn messages_split_across_reads_are_found_once() {
        let mut stream = msg(b'D', b"row1");
        stream.extend(msg(b'C', b"SELECT 1\0"));
        stream.extend(msg(b'Z', b"I"));
        for split in 0..stream.len() {
            let mut s = Scanner::new(|k| k == b'C');
            let mut seen = Vec::new();
            let mut cb = |k: u8, b: &[u8]| seen.push((k, b.to_vec()));
            s.feed(&stream[..split], &mut cb).unwrap();
            s.feed(&stream[split..], &mut cb).unwrap();
            assert_eq!(
                seen,
                vec![
                    (b'D', vec![]),
                    (b'C', b"SELECT 1\0".to_vec()),
                    (b'Z', vec![])
                ]
            );
            assert!(s.at_boundary());
        }
    }

    #[test]
    fn garbage_is_rejected() {
        let mut s = Scanner::new(|_| true);
        assert!(s.feed(b"GET / HTTP/1.1\r\n", |_, _| {}).is_err());
        let mut s = Scanner::new(|_| true);
        assert!(s.feed(&[b'Q', 0, 0, 0, 2], |_, _| {}).is_err());
    }
}
