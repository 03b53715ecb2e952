//! Reading the PostgreSQL wire format safely, and writing it with pgwire.
//!
//! Everything the gateway *sends* is encoded with pgwire's message types.
//! Everything it *receives* from a peer goes through the checked [`Reader`]
//! below instead of pgwire's decoders: those index past the end of a
//! truncated body (a malformed Bind or ErrorResponse panics), and a peer must
//! never be able to panic the gateway.

use std::borrow::Cow;

use bytes::BytesMut;
use pgwire::messages::{response::ErrorResponse, Message};

/// Largest message accepted from either side: PostgreSQL's own limit (1 GiB).
pub const MAX_MESSAGE: usize = 0x3fff_ffff;
/// Largest startup-phase packet (pqcomm.h's MAX_STARTUP_PACKET_LENGTH).
pub const MAX_STARTUP: usize = 10_000;

#[derive(Debug, thiserror::Error)]
#[error("malformed {what} message")]
pub struct Malformed {
    pub what: &'static str,
}

/// A bounds-checked cursor over a message body.
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, what }
    }

    fn err(&self) -> Malformed {
        Malformed { what: self.what }
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.buf.len() < n {
            return Err(self.err());
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.bytes(1)?[0])
    }

    pub fn i16(&mut self) -> Result<i16, Malformed> {
        let b = self.bytes(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub fn i32(&mut self) -> Result<i32, Malformed> {
        let b = self.bytes(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A NUL-terminated string (invalid UTF-8 replaced, for records).
    pub fn cstr(&mut self) -> Result<String, Malformed> {
        self.cstr_borrowed().map(Cow::into_owned)
    }

    /// [`Reader::cstr`] without a copy when the bytes are valid UTF-8: for
    /// names only looked up.
    pub fn cstr_borrowed(&mut self) -> Result<Cow<'a, str>, Malformed> {
        // Every statement's text passes here: memchr and `from_utf8`'s
        // ASCII fast path, rather than a byte loop and the lossy decoder's
        // chunking, which only invalid text needs.
        let end = memchr::memchr(0, self.buf).ok_or(Malformed { what: self.what })?;
        let bytes = &self.buf[..end];
        let text = match std::str::from_utf8(bytes) {
            Ok(text) => Cow::Borrowed(text),
            Err(_) => String::from_utf8_lossy(bytes),
        };
        self.buf = &self.buf[end + 1..];
        Ok(text)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Fields of an ErrorResponse or NoticeResponse body: (code, value) pairs.
pub fn error_fields(body: &[u8]) -> Result<Vec<(u8, String)>, Malformed> {
    let mut r = Reader::new(body, "ErrorResponse");
    let mut fields = Vec::new();
    loop {
        let code = r.u8()?;
        if code == 0 {
            return Ok(fields);
        }
        fields.push((code, r.cstr()?));
    }
}

/// The value of field `code` ('C' SQLSTATE, 'M' message, ...).
pub fn field(fields: &[(u8, String)], code: u8) -> Option<&str> {
    fields
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, v)| v.as_str())
}

/// Appends a pgwire message to `out`.
pub fn encode(message: &impl Message, out: &mut BytesMut) {
    // Encoding only fails for messages over pgwire's size limits; ours are
    // all small and built here, so a failure is a bug worth a loud log.
    if let Err(e) = message.encode(out) {
        tracing::error!("encoding a PostgreSQL message failed: {e}");
    }
}

/// An ErrorResponse with severity, SQLSTATE and message.
pub fn error_response(severity: &str, sqlstate: &str, message: &str) -> ErrorResponse {
    ErrorResponse::new(vec![
        (b'S', severity.to_string()),
        (b'V', severity.to_string()),
        (b'C', sqlstate.to_string()),
        (b'M', message.to_string()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        assert!(error_fields(b"SFATAL").is_err());
        assert!(error_fields(b"S\0").is_err());
        assert!(error_fields(b"").is_err());
        let f = error_fields(b"SERROR\0C42501\0Mno\0\0").unwrap();
        assert_eq!(field(&f, b'C'), Some("42501"));
        let mut r = Reader::new(&[0, 1], "x");
        assert!(r.i32().is_err());
    }
}
