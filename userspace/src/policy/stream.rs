//! Masking in the result stream: DataRow messages and COPY TO rows.
//!
//! An adapter builds one [`RowMasker`] per result set from the
//! RowDescription (or the COPY statement), then passes every row through it.
//! The plan is decided once per result set: which columns are masked whole
//! (column rules), which are scanned by detectors, which pass untouched.
//! Per row, untouched values are copied as bytes and masked values are
//! written straight into the output; nothing is allocated per value.
//!
//! Values a mask hides can also be reported to the audit store's
//! data-subject index ([`RowMasker::index_subjects`]): keyed hashes only,
//! each distinct value once per result set, at most [`SUBJECTS_PER_RESULT`]
//! per result set, collected in the session's [`Fired`].

use std::{
    collections::{BTreeMap, HashSet},
    hash::{BuildHasher, BuildHasherDefault, Hasher},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::{
    detect::{Detector, Stats},
    file::{MaskTarget, Policy},
    mask::{PseudonymKey, Style},
    sql::{Output, Statement},
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StreamError {
    #[error("malformed DataRow from the server: {0}")]
    MalformedRow(&'static str),
}

/// One result column, as RowDescription describes it.
#[derive(Debug, Clone, Copy)]
pub struct Field<'a> {
    pub name: &'a str,
    pub type_oid: u32,
    /// 0 text, 1 binary.
    pub format: i16,
}

/// Most distinct masked values one result set reports to the subject
/// index; beyond it the masker stops looking (a million-row result must
/// not send a million index entries).
pub const SUBJECTS_PER_RESULT: usize = 4096;
/// Most subject-index entries one session collects before its end.
pub const SUBJECTS_PER_SESSION: usize = 65_536;

/// What masking did in one session: how often each mask fired, by mask
/// name (names, not indices, so counts survive a policy reload
/// mid-session), and the keyed hashes of the values it hid, for the
/// data-subject index.
///
/// Maskers count into slots they look up once per result set, not by
/// name per value; each `Fired` has its own id so a masker can tell when
/// it is handed another one.
#[derive(Debug, PartialEq, Eq)]
pub struct Fired {
    id: u64,
    names: Vec<String>,
    counts: Vec<u64>,
    /// The statement whose results pass now, as the adapter numbers it.
    statement: u64,
    subjects: Vec<SubjectHash>,
}

/// The keyed hash of a masked value, and the statement (its number in the
/// session, as the adapter records it) whose result returned it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubjectHash {
    pub statement: u64,
    pub hash: [u8; 32],
}

fn next_fired_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Default for Fired {
    fn default() -> Self {
        Self {
            id: next_fired_id(),
            names: Vec::new(),
            counts: Vec::new(),
            statement: 0,
            subjects: Vec::new(),
        }
    }
}

impl Clone for Fired {
    /// A clone is another tally: it gets its own id.
    fn clone(&self) -> Self {
        Self {
            id: next_fired_id(),
            names: self.names.clone(),
            counts: self.counts.clone(),
            statement: self.statement,
            subjects: self.subjects.clone(),
        }
    }
}

impl Fired {
    fn slot(&mut self, name: &str) -> usize {
        if let Some(i) = self.names.iter().position(|n| n == name) {
            return i;
        }
        self.names.push(name.to_string());
        self.counts.push(0);
        self.names.len() - 1
    }

    /// Mask name to number of values masked.
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.names
            .iter()
            .zip(&self.counts)
            .filter(|(_, n)| **n > 0)
            .map(|(name, n)| (name.clone(), *n))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.iter().all(|n| *n == 0)
    }

    /// Names the statement whose results are masked next (the number it
    /// is recorded under in the session): the subject index points there.
    pub fn set_statement(&mut self, statement: u64) {
        self.statement = statement;
    }

    /// Keyed hashes of the values masked since the last call (see
    /// [`RowMasker::index_subjects`]).
    pub fn take_subjects(&mut self) -> Vec<SubjectHash> {
        std::mem::take(&mut self.subjects)
    }
}

/// The data-subject index key (`audit-subject.key`), as a keyed HMAC
/// state cloned per value: the hash is `HMAC-SHA256(key,
/// lowercase(trim(value)))`, the same as the audit store's look-ups.
/// Shared: a keyed state is a few hundred bytes.
#[derive(Clone)]
pub struct SubjectKey(Arc<Hmac<Sha256>>);

impl std::fmt::Debug for SubjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SubjectKey(..)")
    }
}

impl SubjectKey {
    pub fn new(key: &[u8; 32]) -> Self {
        // HMAC takes keys of any length; new_from_slice cannot fail.
        Self(Arc::new(
            Hmac::<Sha256>::new_from_slice(key).unwrap_or_else(|_| unreachable!()),
        ))
    }

    /// The keyed hash of `value`, normalised like the audit store does
    /// (surrounding white space trimmed, lowercase). `scratch` is reused.
    fn hash(&self, value: &[u8], scratch: &mut Vec<u8>) -> [u8; 32] {
        let mut mac = (*self.0).clone();
        if value.is_ascii() {
            // char::is_whitespace on ASCII (which includes \x0B).
            let space = |c: &u8| matches!(c, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r');
            let start = value.iter().position(|c| !space(c)).unwrap_or(value.len());
            let end = value
                .iter()
                .rposition(|c| !space(c))
                .map_or(start, |e| e + 1);
            let value = &value[start..end];
            if value.iter().any(u8::is_ascii_uppercase) {
                scratch.clear();
                scratch.extend(value.iter().map(u8::to_ascii_lowercase));
                mac.update(scratch);
            } else {
                mac.update(value);
            }
        } else {
            let text = String::from_utf8_lossy(value);
            mac.update(text.trim().to_lowercase().as_bytes());
        }
        mac.finalize().into_bytes().into()
    }
}

/// A result set's reporting to the subject index.
struct Subjects {
    key: SubjectKey,
    /// Fingerprints of the raw values already reported (in memory only),
    /// under a random seed.
    seen: HashSet<u64, BuildHasherDefault<Fingerprinted>>,
    seed: u64,
    scratch: Vec<u8>,
    full: bool,
}

/// PostgreSQL types whose binary format is their text.
fn text_type(oid: u32) -> bool {
    matches!(oid, 18 | 19 | 25 | 114 | 142 | 705 | 1042 | 1043)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Plan {
    Pass,
    /// A column rule: replace the whole value.
    Whole {
        mask: usize,
        style: Style,
    },
    /// A column rule on a binary non-text value: we cannot write a
    /// well-formed masked value of its type, so it becomes NULL.
    Null {
        mask: usize,
    },
    /// Run the content detectors.
    Scan,
}

/// The masking plan of one result set.
pub struct RowMasker {
    policy: Arc<Policy>,
    key: PseudonymKey,
    columns: Vec<Plan>,
    /// Content masks in force: (mask index, detector, style).
    detectors: Vec<(usize, Detector, Style)>,
    /// Reused per value: matches found (start, end, index into
    /// `detectors`), decoded COPY text, masked text.
    hits: Vec<(usize, usize, usize)>,
    decoded: Vec<u8>,
    masked: Vec<u8>,
    tally: Tally,
}

/// Where a masker counts: the [`Fired`] it is bound to, its slot there
/// per policy mask (`NO_SLOT` until first used), and the subject
/// reporting.
struct Tally {
    fired_id: u64,
    slots: Vec<usize>,
    subjects: Option<Box<Subjects>>,
}

const NO_SLOT: usize = usize::MAX;

impl RowMasker {
    /// The plan for a result described by `fields`. `masks` are the mask
    /// indices the engine decided on; `statement` (when known) maps aliased
    /// and computed columns back to their sources. `None` if nothing in
    /// this result can be masked: forward rows untouched.
    pub fn for_rows(
        policy: Arc<Policy>,
        key: PseudonymKey,
        masks: &[usize],
        statement: Option<&Statement>,
        fields: &[Field<'_>],
    ) -> Option<Self> {
        let outputs = statement.map(|s| &s.outputs);
        let positional = outputs
            .filter(|o| !o.star && o.targets.len() == fields.len())
            .map(|o| o.targets.as_slice());
        let columns = fields
            .iter()
            .enumerate()
            .map(|(i, f)| {
                let mut names = vec![f.name.to_lowercase()];
                match (positional, outputs) {
                    (Some(targets), _) => names.extend(targets[i].sources.iter().cloned()),
                    (None, Some(o)) => {
                        for t in &o.targets {
                            if t.name.as_deref() == Some(names[0].as_str()) {
                                names.extend(t.sources.iter().cloned());
                            }
                        }
                    }
                    (None, None) => {}
                }
                plan_column(
                    &policy,
                    masks,
                    &names,
                    f.format == 1 && !text_type(f.type_oid),
                )
            })
            .collect();
        Self::build(policy, key, masks, columns)
    }

    /// The plan for `COPY ... TO` rows in text format. `columns` are the
    /// statement's named columns, if it names them.
    pub fn for_copy(
        policy: Arc<Policy>,
        key: PseudonymKey,
        masks: &[usize],
        columns: Option<&[Output]>,
    ) -> Option<Self> {
        let plans = columns
            .unwrap_or_default()
            .iter()
            .map(|c| {
                let mut names: Vec<String> = c.name.iter().cloned().collect();
                names.extend(c.sources.iter().cloned());
                plan_column(&policy, masks, &names, false)
            })
            .collect();
        Self::build(policy, key, masks, plans)
    }

    fn build(
        policy: Arc<Policy>,
        key: PseudonymKey,
        masks: &[usize],
        columns: Vec<Plan>,
    ) -> Option<Self> {
        let detectors: Vec<_> = masks
            .iter()
            .filter_map(|&i| match &policy.masks.get(i)?.target {
                MaskTarget::Content(d) => Some((i, d.clone(), policy.masks[i].style)),
                MaskTarget::Column { .. } => None,
            })
            .collect();
        if detectors.is_empty() && columns.iter().all(|p| *p == Plan::Pass) {
            return None;
        }
        Some(Self {
            tally: Tally {
                fired_id: 0,
                slots: vec![NO_SLOT; policy.masks.len()],
                subjects: None,
            },
            policy,
            key,
            columns,
            detectors,
            hits: Vec::new(),
            decoded: Vec::new(),
            masked: Vec::new(),
        })
    }

    /// Also reports each distinct value this result set masks to the
    /// session's [`Fired`] as a keyed hash under `key` (at most
    /// [`SUBJECTS_PER_RESULT`]), for the audit store's data-subject index.
    /// The raw value never leaves the masker.
    #[must_use]
    pub fn index_subjects(mut self, key: SubjectKey) -> Self {
        self.tally.subjects = Some(Box::new(Subjects {
            key,
            seen: HashSet::default(),
            seed: std::collections::hash_map::RandomState::new().hash_one(0u64),
            scratch: Vec::new(),
            full: false,
        }));
        self
    }

    /// Masks one DataRow. `body` is the message after its type byte and
    /// length; the complete masked message (`D`, length, body) is appended
    /// to `out`.
    ///
    /// # Errors
    /// [`StreamError::MalformedRow`] if the body is not a valid DataRow; the
    /// caller must not forward it.
    pub fn mask_data_row(
        &mut self,
        body: &[u8],
        out: &mut Vec<u8>,
        fired: &mut Fired,
    ) -> Result<(), StreamError> {
        let count_bytes: [u8; 2] = body
            .get(..2)
            .and_then(|b| b.try_into().ok())
            .ok_or(StreamError::MalformedRow("no column count"))?;
        let count = i16::from_be_bytes(count_bytes);
        self.tally.attach(fired);
        let start = out.len();
        out.push(b'D');
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&count_bytes);
        let mut at = 2;
        for column in 0..usize::try_from(count).unwrap_or(0) {
            let len_bytes: [u8; 4] = body
                .get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .ok_or(StreamError::MalformedRow("truncated value length"))?;
            at += 4;
            let len = i32::from_be_bytes(len_bytes);
            if len < 0 {
                out.extend_from_slice(&len_bytes);
                continue;
            }
            let len = len as usize;
            let value = body
                .get(at..at + len)
                .ok_or(StreamError::MalformedRow("truncated value"))?;
            at += len;
            let plan = self.columns.get(column).copied().unwrap_or(Plan::Scan);
            match plan {
                Plan::Pass => {
                    out.extend_from_slice(&len_bytes);
                    out.extend_from_slice(value);
                }
                Plan::Null { mask } => {
                    // A binary value: counted, but not reported (a look-up
                    // by its text would not find its bytes).
                    self.tally.count(&self.policy, mask, fired);
                    out.extend_from_slice(&(-1i32).to_be_bytes());
                }
                Plan::Whole { .. } | Plan::Scan => {
                    let len_at = out.len();
                    out.extend_from_slice(&[0; 4]);
                    self.mask_value(plan, value, out, fired);
                    let written = (out.len() - len_at - 4) as i32;
                    out[len_at..len_at + 4].copy_from_slice(&written.to_be_bytes());
                }
            }
        }
        if at != body.len() {
            out.truncate(start);
            return Err(StreamError::MalformedRow("trailing bytes"));
        }
        let total = (out.len() - start - 1) as i32;
        out[start + 1..start + 5].copy_from_slice(&total.to_be_bytes());
        Ok(())
    }

    /// Masks one COPY TO row in text format (the payload of one CopyData
    /// message: tab-separated fields, `\N` for NULL, backslash escapes,
    /// ending in a newline); appends the masked row to `out`.
    pub fn mask_copy_row(&mut self, row: &[u8], out: &mut Vec<u8>, fired: &mut Fired) {
        self.tally.attach(fired);
        let (line, newline) = match row.strip_suffix(b"\n") {
            Some(line) => (line, true),
            None => (row, false),
        };
        for (column, field) in line.split(|&b| b == b'\t').enumerate() {
            if column > 0 {
                out.push(b'\t');
            }
            let plan = self.columns.get(column).copied().unwrap_or(Plan::Scan);
            if field == b"\\N" || plan == Plan::Pass {
                out.extend_from_slice(field);
                continue;
            }
            if !field.contains(&b'\\') {
                self.mask_value(plan, field, out, fired);
                continue;
            }
            let mut decoded = std::mem::take(&mut self.decoded);
            decoded.clear();
            copy_unescape(field, &mut decoded);
            let mut masked = std::mem::take(&mut self.masked);
            masked.clear();
            self.mask_value(plan, &decoded, &mut masked, fired);
            copy_escape(&masked, out);
            self.decoded = decoded;
            self.masked = masked;
        }
        if newline {
            out.push(b'\n');
        }
    }

    #[inline]
    fn mask_value(&mut self, plan: Plan, value: &[u8], out: &mut Vec<u8>, fired: &mut Fired) {
        match plan {
            Plan::Whole { mask, style } => {
                self.tally.count(&self.policy, mask, fired);
                self.tally.report(value, fired);
                style.apply(value, &self.key, out);
            }
            Plan::Scan => self.scan(value, out, fired),
            Plan::Pass | Plan::Null { .. } => out.extend_from_slice(value),
        }
    }

    /// Runs the content detectors over `value`, writing it to `out` with
    /// every match masked.
    fn scan(&mut self, value: &[u8], out: &mut Vec<u8>, fired: &mut Fired) {
        let stats = Stats::of(value);
        self.hits.clear();
        for (index, (_, detector, _)) in self.detectors.iter().enumerate() {
            if !detector.may_match(&stats) {
                continue;
            }
            let hits = &mut self.hits;
            detector.each_match(value, &mut |s, e| hits.push((s, e, index)));
        }
        if self.hits.is_empty() {
            out.extend_from_slice(value);
            return;
        }
        if !self.hits.windows(2).all(|w| w[0].0 < w[1].0) {
            self.hits
                .sort_unstable_by_key(|h| (h.0, std::cmp::Reverse(h.1)));
        }
        let mut at = 0;
        for &(start, end, index) in &self.hits {
            if start < at {
                continue; // overlaps a match already masked
            }
            out.extend_from_slice(&value[at..start]);
            let (mask, _, style) = &self.detectors[index];
            let found = &value[start..end];
            style.apply(found, &self.key, out);
            self.tally.count(&self.policy, *mask, fired);
            self.tally.report(found, fired);
            at = end;
        }
        out.extend_from_slice(&value[at..]);
    }
}

impl Tally {
    /// Binds to `fired` (a new one: slots looked up afresh).
    #[inline]
    fn attach(&mut self, fired: &Fired) {
        if self.fired_id != fired.id {
            self.fired_id = fired.id;
            self.slots.fill(NO_SLOT);
        }
    }

    /// Counts one value hidden by policy mask `mask`.
    #[inline]
    fn count(&mut self, policy: &Policy, mask: usize, fired: &mut Fired) {
        let slot = match self.slots.get(mask) {
            Some(&NO_SLOT) | None => {
                let slot = fired.slot(mask_name(policy, mask));
                if let Some(s) = self.slots.get_mut(mask) {
                    *s = slot;
                }
                slot
            }
            Some(&slot) => slot,
        };
        if let Some(n) = fired.counts.get_mut(slot) {
            *n += 1;
        }
    }

    /// Reports a hidden text value to the subject index, when that is on.
    #[inline]
    fn report(&mut self, value: &[u8], fired: &mut Fired) {
        if let Some(subjects) = self.subjects.as_deref_mut() {
            if !subjects.full {
                subjects.report(value, fired);
            }
        }
    }
}

/// A seeded 64-bit fingerprint of a raw value: a few multiplications per
/// eight bytes, enough to tell repeats apart (a collision only means a
/// value is not reported twice).
fn fingerprint(seed: u64, value: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h = seed ^ (value.len() as u64).wrapping_mul(K);
    let mut chunks = value.chunks_exact(8);
    for c in &mut chunks {
        let word = u64::from_le_bytes(c.try_into().unwrap_or_default());
        h = (h ^ word).wrapping_mul(K).rotate_left(29);
    }
    let mut tail = [0u8; 8];
    tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    h = (h ^ u64::from_le_bytes(tail)).wrapping_mul(K);
    h ^ (h >> 29)
}

/// The hasher of a set of fingerprints: they are hashes already.
#[derive(Default)]
struct Fingerprinted(u64);

impl Hasher for Fingerprinted {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl Subjects {
    #[cold]
    fn stop(&mut self) {
        self.full = true;
        self.seen = HashSet::default();
    }

    fn report(&mut self, value: &[u8], fired: &mut Fired) {
        if !self.seen.insert(fingerprint(self.seed, value)) {
            return;
        }
        if self.seen.len() > SUBJECTS_PER_RESULT || fired.subjects.len() >= SUBJECTS_PER_SESSION {
            self.stop();
            return;
        }
        let hash = self.key.hash(value, &mut self.scratch);
        let new = SubjectHash {
            statement: fired.statement,
            hash,
        };
        // Values differing only in case or surrounding space hash alike.
        if !fired.subjects.iter().rev().take(8).any(|h| *h == new) {
            fired.subjects.push(new);
        }
    }
}

fn mask_name(policy: &Policy, mask: usize) -> &str {
    policy.masks.get(mask).map_or("?", |m| m.name.as_str())
}

fn plan_column(policy: &Policy, masks: &[usize], names: &[String], binary_non_text: bool) -> Plan {
    let rule = masks.iter().find_map(|&i| {
        let m = policy.masks.get(i)?;
        let MaskTarget::Column {
            names: wanted,
            pattern,
            ..
        } = &m.target
        else {
            return None;
        };
        names
            .iter()
            .any(|n| wanted.contains(n) || pattern.as_ref().is_some_and(|p| p.is_match(n)))
            .then_some((i, m.style))
    });
    match (rule, binary_non_text) {
        (Some((mask, _)), true) => Plan::Null { mask },
        (Some((mask, style)), false) => Plan::Whole { mask, style },
        (None, true) => Plan::Pass,
        (None, false) => Plan::Scan,
    }
}

fn copy_unescape(field: &[u8], out: &mut Vec<u8>) {
    let mut bytes = field.iter().copied();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b't') => out.push(b'\t'),
            Some(b'n') => out.push(b'\n'),
            Some(b'r') => out.push(b'\r'),
            Some(b'b') => out.push(8),
            Some(b'f') => out.push(12),
            Some(b'v') => out.push(11),
            Some(other) => out.push(other),
            None => out.push(b'\\'),
        }
    }
}

fn copy_escape(value: &[u8], out: &mut Vec<u8>) {
    for &b in value {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            _ => out.push(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::sql::classify;

    const POLICY: &str = r#"
[[mask]]
name = "emails"
detector = "email"
style = "redact"

[[mask]]
name = "cards"
detector = "card"
style = "partial"
keep_last = 4

[[mask]]
name = "ssn-column"
columns = ["ssn"]
style = "redact"
"#;

    fn row(values: &[Option<&[u8]>]) -> Vec<u8> {
        let mut body = (values.len() as i16).to_be_bytes().to_vec();
        for v in values {
            match v {
                None => body.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    body.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    body.extend_from_slice(v);
                }
            }
        }
        body
    }

    fn values(message: &[u8]) -> Vec<Option<String>> {
        assert_eq!(message[0], b'D');
        let len = i32::from_be_bytes(message[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, message.len() - 1);
        let mut out = Vec::new();
        let count = i16::from_be_bytes(message[5..7].try_into().unwrap());
        let mut at = 7;
        for _ in 0..count {
            let l = i32::from_be_bytes(message[at..at + 4].try_into().unwrap());
            at += 4;
            if l < 0 {
                out.push(None);
            } else {
                out.push(Some(
                    String::from_utf8(message[at..at + l as usize].to_vec()).unwrap(),
                ));
                at += l as usize;
            }
        }
        out
    }

    fn masker(sql: &str, fields: &[Field<'_>]) -> RowMasker {
        let policy = Arc::new(Policy::parse(POLICY).unwrap());
        let statement = classify(sql, &[]).unwrap().remove(0);
        RowMasker::for_rows(
            policy,
            PseudonymKey::from_bytes(b"k"),
            &[0, 1, 2],
            Some(&statement),
            fields,
        )
        .unwrap()
    }

    fn text(name: &str) -> Field<'_> {
        Field {
            name,
            type_oid: 25,
            format: 0,
        }
    }

    #[test]
    fn data_rows_are_masked_by_column_and_content() {
        let mut m = masker(
            "SELECT id, note, ssn AS s FROM people",
            &[text("id"), text("note"), text("s")],
        );
        let mut out = Vec::new();
        let mut fired = Fired::default();
        let body = row(&[
            Some(b"4111111111111112"),
            Some(b"mail ann@example.com, card 4111 1111 1111 1111"),
            Some(b"123-45-6789"),
        ]);
        m.mask_data_row(&body, &mut out, &mut fired).unwrap();
        assert_eq!(
            values(&out),
            [
                Some("4111111111111112".to_string()),
                Some("mail ***, card **** **** **** 1111".to_string()),
                Some("***".to_string()),
            ]
        );
        let counts = fired.counts();
        let summary: Vec<_> = counts.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(summary, [("cards", 1), ("emails", 1), ("ssn-column", 1)]);
        out.clear();
        m.mask_data_row(&row(&[None, Some(b"nothing"), None]), &mut out, &mut fired)
            .unwrap();
        assert_eq!(values(&out), [None, Some("nothing".to_string()), None]);
    }

    #[test]
    fn binary_non_text_column_rule_becomes_null() {
        let mut m = masker(
            "SELECT ssn FROM people",
            &[Field {
                name: "ssn",
                type_oid: 23,
                format: 1,
            }],
        );
        let mut out = Vec::new();
        m.mask_data_row(
            &row(&[Some(&[0, 0, 0, 7])]),
            &mut out,
            &mut Fired::default(),
        )
        .unwrap();
        assert_eq!(values(&out), [None]);
    }

    #[test]
    fn malformed_rows_are_errors_not_panics() {
        let mut m = masker("SELECT note FROM t", &[text("note")]);
        let mut out = Vec::new();
        let mut fired = Fired::default();
        for bad in [
            &b""[..],
            &[0, 1],
            &[0, 1, 0, 0, 0, 9, b'x'],
            &[0, 1, 0xff, 0xff, 0xff, 0xff, 1],
        ] {
            assert!(
                m.mask_data_row(bad, &mut out, &mut fired).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn copy_rows_keep_their_escapes() {
        let policy = Arc::new(Policy::parse(POLICY).unwrap());
        let statement = classify("COPY people (id, ssn, note) TO STDOUT", &[])
            .unwrap()
            .remove(0);
        let columns = statement.copy_out.as_ref().unwrap().columns.as_deref();
        let mut m =
            RowMasker::for_copy(policy, PseudonymKey::from_bytes(b"k"), &[0, 1, 2], columns)
                .unwrap();
        let mut out = Vec::new();
        let mut fired = Fired::default();
        m.mask_copy_row(
            b"7\t123-45-6789\ta\\tb ann@example.com\\n\n",
            &mut out,
            &mut fired,
        );
        assert_eq!(out, b"7\t***\ta\\tb ***\\n\n");
        out.clear();
        m.mask_copy_row(b"8\t\\N\t\\N\n", &mut out, &mut fired);
        assert_eq!(out, b"8\t\\N\t\\N\n");
    }

    #[test]
    fn masked_values_are_reported_once_per_result_as_keyed_hashes() {
        use crate::audit::subject::subject_hash;
        let key = [9u8; 32];
        let mut m = masker("SELECT note, ssn FROM people", &[text("note"), text("ssn")])
            .index_subjects(SubjectKey::new(&key));
        let mut out = Vec::new();
        let mut fired = Fired::default();
        fired.set_statement(3);
        for note in [
            &b"mail Ann@Example.com"[..],
            b"again Ann@Example.com",
            b"and bob@example.org",
        ] {
            m.mask_data_row(
                &row(&[Some(note), Some(b"123-45-6789")]),
                &mut out,
                &mut fired,
            )
            .unwrap();
        }
        let hashes: Vec<_> = fired
            .take_subjects()
            .iter()
            .map(|s| (s.statement, s.hash))
            .collect();
        assert_eq!(
            hashes,
            [
                (3, subject_hash(&key, "ann@example.com")),
                (3, subject_hash(&key, "123-45-6789")),
                (3, subject_hash(&key, "bob@example.org")),
            ]
        );
        // The next statement's result names that statement.
        let mut next =
            masker("SELECT note FROM t", &[text("note")]).index_subjects(SubjectKey::new(&key));
        fired.set_statement(5);
        next.mask_data_row(&row(&[Some(b"ann@example.com")]), &mut out, &mut fired)
            .unwrap();
        assert_eq!(fired.take_subjects().last().unwrap().statement, 5);
        assert_eq!(fired.counts()["emails"], 4);
        // Without index_subjects nothing is reported.
        let mut quiet = Fired::default();
        masker("SELECT note FROM t", &[text("note")])
            .mask_data_row(&row(&[Some(b"ann@example.com")]), &mut out, &mut quiet)
            .unwrap();
        assert!(quiet.take_subjects().is_empty());
        assert_eq!(quiet.counts()["emails"], 1);
    }

    #[test]
    fn subject_reports_stop_at_the_cap() {
        let mut m =
            masker("SELECT note FROM t", &[text("note")]).index_subjects(SubjectKey::new(&[1; 32]));
        let mut out = Vec::new();
        let mut fired = Fired::default();
        for i in 0..SUBJECTS_PER_RESULT + 100 {
            let note = format!("user{i}@example.com");
            m.mask_data_row(&row(&[Some(note.as_bytes())]), &mut out, &mut fired)
                .unwrap();
            out.clear();
        }
        assert_eq!(fired.take_subjects().len(), SUBJECTS_PER_RESULT);
        assert_eq!(fired.counts()["emails"], (SUBJECTS_PER_RESULT + 100) as u64);
    }

    #[test]
    fn a_masker_handed_another_tally_counts_there() {
        let mut m = masker("SELECT note FROM t", &[text("note")]);
        let (mut a, mut b) = (Fired::default(), Fired::default());
        let mut out = Vec::new();
        let body = row(&[Some(b"ann@example.com")]);
        m.mask_data_row(&body, &mut out, &mut a).unwrap();
        m.mask_data_row(&body, &mut out, &mut b).unwrap();
        m.mask_data_row(&body, &mut out, &mut b).unwrap();
        assert_eq!(a.counts()["emails"], 1);
        assert_eq!(b.counts()["emails"], 2);
        let c = b.clone();
        m.mask_data_row(&body, &mut out, &mut b).unwrap();
        assert_eq!(c.counts()["emails"], 2);
        assert_eq!(b.counts()["emails"], 3);
    }
}
