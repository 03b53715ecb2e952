//! Masking in the result stream: DataRow messages and COPY TO rows.
//!
//! An adapter builds one [`RowMasker`] per result set from the
//! RowDescription (or the COPY statement), then passes every row through it.
//! The plan is decided once per result set: which columns are masked whole
//! (column rules), which are scanned by detectors, which pass untouched.
//! Per row, untouched values are copied as bytes; nothing is allocated
//! unless a detector finds something (and then only into reused buffers).

use std::{collections::BTreeMap, sync::Arc};

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

/// How often each mask fired in a session, by mask name (names, not
/// indices, so counts survive a policy reload mid-session).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fired(BTreeMap<String, u64>);

impl Fired {
    fn hit(&mut self, name: &str) {
        match self.0.get_mut(name) {
            Some(n) => *n += 1,
            None => {
                self.0.insert(name.to_string(), 1);
            }
        }
    }

    /// Mask name to number of values masked.
    pub fn counts(&self) -> &BTreeMap<String, u64> {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
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
}

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
            policy,
            key,
            columns,
            detectors,
            hits: Vec::new(),
            decoded: Vec::new(),
            masked: Vec::new(),
        })
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
                    fired.hit(mask_name(&self.policy, mask));
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

    fn mask_value(&mut self, plan: Plan, value: &[u8], out: &mut Vec<u8>, fired: &mut Fired) {
        match plan {
            Plan::Whole { mask, style } => {
                fired.hit(mask_name(&self.policy, mask));
                style.apply(value, &self.key, out);
            }
            Plan::Scan => self.scan(value, out, fired),
            Plan::Pass | Plan::Null { .. } => out.extend_from_slice(value),
        }
    }

    fn scan(&mut self, value: &[u8], out: &mut Vec<u8>, fired: &mut Fired) {
        self.hits.clear();
        let stats = Stats::of(value);
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
        if self.hits.len() > 1 {
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
            let mask = *mask;
            style.apply(&value[start..end], &self.key, out);
            fired.hit(mask_name(&self.policy, mask));
            at = end;
        }
        out.extend_from_slice(&value[at..]);
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
        let summary: Vec<_> = fired
            .counts()
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
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
}
