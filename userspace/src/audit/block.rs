//! Chain blocks: how records of consecutive seqs are stored together.
//!
//! A block is the encoded records (compact JSON, one per line) joined by
//! `\n`, stored in a segment file (see [`super::segment`]); the `chain`
//! tree maps the big-endian seq of its first record to where it is. A
//! record's position is its block's key plus its line index, so a line
//! deleted, inserted or moved inside a block shifts the lines after it and
//! verification sees a position that holds another record, exactly as it
//! saw a record moved to another key before blocks. Stores written before
//! segments hold blocks inline in the tree, and stores written before
//! blocks hold one record per value, a block of one: both read unchanged.
//!
//! Blocks exist for the writer's sake: one index entry per block instead
//! of one per record. They are append-only (a commit never merges into an
//! earlier block; only a retention purge rewrites a block, with the same
//! lines) and capped at [`BLOCK_BYTES`].

use super::AuditError;

/// A block is closed before it would exceed this many bytes (a single
/// larger record is a block of its own). Reading one record reads its
/// whole block, so this bounds the cost of a lookup by seq, while keeping
/// the index at one 17-byte extent per ~70 statement records.
pub const BLOCK_BYTES: usize = 32 * 1024;

/// Separates the records of a block. Compact JSON never holds a raw
/// newline: inside strings it is escaped, and there is no whitespace
/// between tokens.
pub const SEPARATOR: u8 = b'\n';

/// The lines of a block, in order. An empty value is one empty line, so
/// that verification reports it rather than skipping it.
pub fn lines(block: &[u8]) -> impl Iterator<Item = &[u8]> {
    block.split(|&b| b == SEPARATOR)
}

/// Line `index` of a block, if the block has that many.
pub fn line(block: &[u8], index: u64) -> Option<&[u8]> {
    let index = usize::try_from(index).ok()?;
    lines(block).nth(index)
}

/// The last line of a block and its index.
pub fn last_line(block: &[u8]) -> (u64, &[u8]) {
    let index = block.iter().filter(|&&b| b == SEPARATOR).count() as u64;
    let start = block
        .iter()
        .rposition(|&b| b == SEPARATOR)
        .map_or(0, |i| i + 1);
    (index, &block[start..])
}

/// Checks that an encoded record can be a line of a block.
fn check_line(seq: u64, encoded: &[u8]) -> Result<(), AuditError> {
    if encoded.is_empty() {
        return Err(AuditError::Commit(format!(
            "record {seq} encodes to nothing"
        )));
    }
    if memchr::memchr(SEPARATOR, encoded).is_some() {
        // Only a payload built by hand as a RawValue with line breaks
        // between tokens can do this; events are serialised compactly.
        return Err(AuditError::Commit(format!(
            "record {seq} holds a raw line break (its payload is not compact JSON), so it \
             cannot be stored in a chain block; serialise the event with serde_json::to_string"
        )));
    }
    Ok(())
}

/// Cuts the encoded records of one commit (consecutive seqs) into blocks.
#[derive(Debug)]
pub struct Blocks {
    cap: usize,
    /// Finished blocks: key (first seq) and value.
    done: Vec<(u64, Vec<u8>)>,
    /// The open block's first seq, the seq it expects next, and its bytes.
    open: Option<(u64, u64, Vec<u8>)>,
}

impl Default for Blocks {
    fn default() -> Self {
        Self::with_cap(BLOCK_BYTES)
    }
}

impl Blocks {
    pub fn with_cap(cap: usize) -> Self {
        Self {
            cap,
            done: Vec::new(),
            open: None,
        }
    }

    /// Appends record `seq`, starting a new block if the open one would
    /// grow past the cap or does not end at `seq - 1`.
    ///
    /// # Errors
    /// An encoded record that is empty or holds a raw line break.
    pub fn push(&mut self, seq: u64, encoded: &[u8]) -> Result<(), AuditError> {
        check_line(seq, encoded)?;
        if let Some((_, next, bytes)) = &mut self.open {
            if *next == seq && bytes.len() + 1 + encoded.len() <= self.cap {
                bytes.push(SEPARATOR);
                bytes.extend_from_slice(encoded);
                *next = seq + 1;
                return Ok(());
            }
        }
        self.close();
        let mut bytes = Vec::with_capacity(self.cap.max(encoded.len()));
        bytes.extend_from_slice(encoded);
        self.open = Some((seq, seq + 1, bytes));
        Ok(())
    }

    fn close(&mut self) {
        if let Some((first, _, bytes)) = self.open.take() {
            self.done.push((first, bytes));
        }
    }

    /// The blocks, keyed by their first seq, in order.
    pub fn finish(mut self) -> Vec<(u64, Vec<u8>)> {
        self.close();
        self.done
    }
}

/// Rewrites block `key`: `f` gets each line's position and bytes and
/// returns a replacement, or `None` to keep the line byte for byte.
///
/// # Errors
/// Whatever `f` returns, and a replacement that cannot be a line.
pub fn rewrite(
    key: u64,
    block: &[u8],
    mut f: impl FnMut(u64, &[u8]) -> Result<Option<Vec<u8>>, AuditError>,
) -> Result<Vec<u8>, AuditError> {
    let mut out = Vec::with_capacity(block.len());
    for (index, old) in lines(block).enumerate() {
        let seq = key.saturating_add(index as u64);
        if index > 0 {
            out.push(SEPARATOR);
        }
        match f(seq, old)? {
            Some(new) => {
                check_line(seq, &new)?;
                out.extend_from_slice(&new);
            }
            None => out.extend_from_slice(old),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_on_newlines_and_keep_empty_ones() {
        assert_eq!(lines(b"a\nb\nc").collect::<Vec<_>>(), [b"a", b"b", b"c"]);
        assert_eq!(lines(b"").collect::<Vec<_>>(), [b""]);
        assert_eq!(lines(b"a\n").collect::<Vec<_>>(), [&b"a"[..], b""]);
        assert_eq!(line(b"a\nb", 1), Some(&b"b"[..]));
        assert_eq!(line(b"a\nb", 2), None);
        assert_eq!(last_line(b"a\nbb\nccc"), (2, &b"ccc"[..]));
        assert_eq!(last_line(b"single"), (0, &b"single"[..]));
        assert_eq!(last_line(b"a\n"), (1, &b""[..]));
    }

    #[test]
    fn blocks_are_cut_at_the_cap_and_at_gaps() {
        let mut blocks = Blocks::with_cap(10);
        for seq in 1..=5 {
            blocks.push(seq, b"abcd").unwrap();
        }
        // A record larger than the cap is a block of its own.
        blocks.push(6, b"0123456789abc").unwrap();
        blocks.push(7, b"x").unwrap();
        // Not consecutive: a new block.
        blocks.push(9, b"y").unwrap();
        assert_eq!(
            blocks.finish(),
            vec![
                (1, b"abcd\nabcd".to_vec()),
                (3, b"abcd\nabcd".to_vec()),
                (5, b"abcd".to_vec()),
                (6, b"0123456789abc".to_vec()),
                (7, b"x".to_vec()),
                (9, b"y".to_vec()),
            ]
        );
    }

    #[test]
    fn a_line_break_or_empty_record_is_refused() {
        let mut blocks = Blocks::default();
        let err = blocks.push(4, b"{\"a\":\n1}").unwrap_err().to_string();
        assert!(err.contains("record 4 holds a raw line break"), "{err}");
        assert!(blocks.push(5, b"").is_err());
        assert!(blocks.finish().is_empty());
    }

    #[test]
    fn rewrite_replaces_chosen_lines_and_keeps_the_rest() {
        let block = b"one\ntwo\nthree";
        let out = rewrite(10, block, |seq, old| {
            Ok((seq == 11).then(|| [old, b"!"].concat()))
        })
        .unwrap();
        assert_eq!(out, b"one\ntwo!\nthree");
        assert!(rewrite(10, block, |_, _| Ok(Some(b"a\nb".to_vec()))).is_err());
    }
}
