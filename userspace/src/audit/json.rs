//! Events as the JSON text that is hashed and stored.
//!
//! Every event goes through serde, except a statement: one is recorded per
//! statement a session relays, on the session's own thread, and serde's
//! derived serializer writes it in many small appends to a growing buffer,
//! escaping every key. That was a tenth of the thread's CPU on a gateway
//! relaying small queries. [`statement`] writes the same bytes (a test
//! compares them with serde's) into a buffer sized once.

use super::event::{AuditEvent, Statement};

/// `event` as compact JSON, byte for byte what `serde_json::to_string`
/// makes of it.
pub fn event(event: &AuditEvent) -> Result<String, serde_json::Error> {
    match event {
        AuditEvent::Statement(s) => Ok(statement(s)),
        other => serde_json::to_string(other),
    }
}

fn statement(s: &Statement) -> String {
    let parameters: usize = s
        .parameters
        .iter()
        .map(|p| p.as_ref().map_or(4, String::len) + 3)
        .sum();
    let error = s
        .error
        .as_ref()
        .map_or(0, |e| e.sqlstate.len() + e.message.len());
    let optional = s.command_tag.as_ref().map_or(0, String::len);
    let mut out = String::with_capacity(
        320 + s.session.len() + s.resource.len() + s.text.len() + parameters + error + optional,
    );
    let mut number = itoa::Buffer::new();
    out.push_str(r#"{"event":"statement","session":"#);
    string(&mut out, &s.session);
    out.push_str(r#","statement_seq":"#);
    out.push_str(number.format(s.statement_seq));
    out.push_str(r#","resource":"#);
    string(&mut out, &s.resource);
    out.push_str(r#","protocol":"#);
    string(&mut out, s.protocol);
    out.push_str(r#","text":"#);
    string(&mut out, &s.text);
    if !s.parameters.is_empty() {
        out.push_str(r#","parameters":["#);
        for (i, parameter) in s.parameters.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            match parameter {
                Some(value) => string(&mut out, value),
                None => out.push_str("null"),
            }
        }
        out.push(']');
    }
    out.push_str(r#","duration_us":"#);
    out.push_str(number.format(s.duration_us));
    out.push_str(r#","rows_returned":"#);
    out.push_str(number.format(s.rows_returned));
    out.push_str(r#","rows":"#);
    match s.rows {
        Some(rows) => out.push_str(number.format(rows)),
        None => out.push_str("null"),
    }
    out.push_str(r#","command_tag":"#);
    match &s.command_tag {
        Some(tag) => string(&mut out, tag),
        None => out.push_str("null"),
    }
    out.push_str(r#","error":"#);
    match &s.error {
        Some(e) => {
            out.push_str(r#"{"sqlstate":"#);
            string(&mut out, &e.sqlstate);
            out.push_str(r#","message":"#);
            string(&mut out, &e.message);
            out.push('}');
        }
        None => out.push_str("null"),
    }
    out.push('}');
    out
}

/// Appends `s` as a JSON string, escaped as serde_json escapes: `"`, `\`
/// and control characters, with the short forms where JSON has them.
fn string(out: &mut String, s: &str) {
    out.push('"');
    // Nearly every string needs no escape. This check has no early exit,
    // so it compiles to vector instructions: several times faster than
    // the loop below, which it lets almost every string skip.
    let needs_escape = |b: u8| b < 0x20 || b == b'"' || b == b'\\';
    if !s.bytes().fold(false, |any, b| any | needs_escape(b)) {
        out.push_str(s);
        out.push('"');
        return;
    }
    let mut plain = 0;
    for (i, byte) in s.bytes().enumerate() {
        let escape = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        // Only ASCII bytes are escaped, so `plain..i` is on char boundaries.
        out.push_str(&s[plain..i]);
        plain = i + 1;
        if escape.is_empty() {
            const DIGITS: &[u8; 16] = b"0123456789abcdef";
            out.push_str("\\u00");
            out.push(char::from(DIGITS[usize::from(byte >> 4)]));
            out.push(char::from(DIGITS[usize::from(byte & 0xf)]));
        } else {
            out.push_str(escape);
        }
    }
    out.push_str(&s[plain..]);
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::event::StatementError;

    fn statement(text: &str) -> Statement {
        Statement {
            session: "6f1c0c9e-5b1e-4d0c-9d3e-2a7f1b9c8d00".into(),
            statement_seq: 7,
            resource: "orders-db".into(),
            protocol: "simple",
            text: text.into(),
            parameters: Vec::new(),
            duration_us: 1234,
            rows_returned: 1,
            rows: Some(1),
            command_tag: Some("SELECT 1".into()),
            error: None,
        }
    }

    fn same_as_serde(s: Statement) {
        let event = AuditEvent::Statement(s);
        assert_eq!(
            super::event(&event).unwrap(),
            serde_json::to_string(&event).unwrap()
        );
    }

    #[test]
    fn a_statement_is_written_as_serde_writes_it() {
        same_as_serde(statement(
            "SELECT abalance FROM pgbench_accounts WHERE aid = 42;",
        ));
        let mut all_fields = statement("insert into t values ($1, $2, $3)");
        all_fields.protocol = "extended";
        all_fields.parameters = vec![Some("a\"b\\c".into()), None, Some(String::new())];
        all_fields.rows = None;
        all_fields.command_tag = None;
        all_fields.error = Some(StatementError {
            sqlstate: "23505".into(),
            message: "duplicate key value violates unique constraint \"t_pkey\"".into(),
        });
        same_as_serde(all_fields);
    }

    #[test]
    fn every_character_is_escaped_as_serde_escapes_it() {
        let every_ascii: String = (0u8..=0x7f).map(char::from).collect();
        for text in [
            every_ascii.as_str(),
            "",
            "\u{7f}\u{80}\u{ff}",
            "名前 = 'Zoë' -- 🚀\n\t",
            "\\\\\"\"",
            "\u{2028}\u{2029}",
        ] {
            same_as_serde(statement(text));
        }
    }
}
