//! The policy in the PostgreSQL stream: the [`super::relay`]'s optional
//! hook, used when a policy file is configured.
//!
//! Client to server ([`Judge`]), every Query and Parse is judged before it
//! is forwarded. Allowed messages go on unchanged. A blocked one is replaced
//! by a `DO` block that raises SQLSTATE 42501 with the rule's reason, so the
//! *server* answers it, in order with everything else the client pipelined,
//! and the session (and its transaction state) stays exactly as PostgreSQL
//! would leave it after a permission error. A message that needs approval
//! is held: the client gets a NoticeResponse with the request id, and
//! nothing more from it is read until an approver decides, the request
//! times out (then it runs, or is replaced as if blocked), or the client
//! cancels it with a CancelRequest (replaced by a `DO` block raising 57014,
//! as a cancelled statement would).
//!
//! Server to client ([`Results`]), RowDescription, DataRow, CopyOutResponse
//! and CopyData are rewritten when masks apply; every other message is
//! copied through. Responses are matched to requests with a queue, as in
//! [`super::statements`].

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use tokio::sync::mpsc;

mod framer;
mod judge;
mod results;

pub use self::{judge::Judge, results::Results};
use super::cancel::Held;
use crate::{
    identity::Principal,
    policy::{
        runtime::{Proceed, Stopped},
        PolicyRuntime,
    },
};

/// Who is asking, where: what the policy needs for one session.
pub struct Guard {
    pub runtime: Arc<PolicyRuntime>,
    pub session: String,
    pub resource: String,
    pub principal: Principal,
    /// Where the session's CancelRequests end a hold.
    pub held: Arc<Held>,
}

impl Guard {
    /// The two halves of the hook: one per direction.
    pub fn split(self) -> (Judge, Results) {
        let queue: Queue = Arc::default();
        let (notices, notices_rx) = mpsc::unbounded_channel();
        let results = Results::new(
            Arc::clone(&self.runtime),
            self.session.clone(),
            self.resource.clone(),
            Arc::clone(&queue),
            notices_rx,
        );
        (Judge::new(self, queue, notices), results)
    }
}

/// What the client is waiting for, in order; the server half pops them.
enum Expect {
    /// A simple Query: results per statement until ReadyForQuery.
    Query(Option<Arc<Proceed>>),
    /// Describe of a prepared statement: ParameterDescription, then
    /// RowDescription or NoData.
    DescribeStatement(String),
    DescribePortal(String),
    Execute {
        proceed: Option<Arc<Proceed>>,
        statement: String,
        portal: String,
        formats: Vec<i16>,
    },
    /// A Parse of this statement name: its old description is stale.
    Parsed(String),
    /// A Bind of this portal name: its old description is stale.
    Bound(String),
    /// Close (or a malformed message): one reply.
    Other,
    Sync,
}

type Queue = Arc<Mutex<VecDeque<Expect>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn message(kind: u8, body: &[u8], out: &mut Vec<u8>) {
    out.push(kind);
    out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
}

fn cstr(s: &str, out: &mut Vec<u8>) {
    out.extend(s.bytes().filter(|b| *b != 0));
    out.push(0);
}

/// A NoticeResponse.
fn notice(text: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(text.len() + 32);
    for (code, value) in [
        (b'S', "NOTICE"),
        (b'V', "NOTICE"),
        (b'C', "00000"),
        (b'M', text),
    ] {
        body.push(code);
        cstr(value, &mut body);
    }
    body.push(0);
    let mut out = Vec::with_capacity(body.len() + 5);
    message(b'N', &body, &mut out);
    out
}

/// SQL that makes the server raise the error a stopped statement gets:
/// 42501 with the rule's reason, or 57014 for a cancelled wait.
fn stand_in(stopped: &Stopped) -> String {
    let quote = |s: &str| {
        s.chars()
            .filter(|c| *c != '$' && *c != '\0')
            .collect::<String>()
            .replace('\'', "''")
    };
    let (sqlstate, message, hint) = match stopped {
        Stopped::Refused(refusal) => (
            "42501",
            quote(&refusal.reason),
            format!(
                ", HINT = 'refused by Portcullis policy rule \"{}\"'",
                quote(&refusal.rule)
            ),
        ),
        Stopped::Cancelled => (
            "57014",
            "canceling statement due to user request".into(),
            String::new(),
        ),
    };
    format!(
        "DO $portcullis$BEGIN RAISE EXCEPTION USING ERRCODE = '{sqlstate}', MESSAGE = '{message}'{hint}; END$portcullis$"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::runtime::Refusal;

    #[test]
    fn refusals_cannot_break_out_of_the_do_block() {
        let sql = stand_in(&Stopped::Refused(Refusal {
            rule: "r'$x".into(),
            reason: "it's $portcullis$; DROP TABLE t; --".into(),
        }));
        let parsed = crate::policy::classify(&sql, &[]).unwrap();
        assert_eq!(parsed.len(), 1, "{sql}");
        assert_eq!(parsed[0].command, "DO");
        assert!(sql.contains("it''s portcullis; DROP TABLE t; --"), "{sql}");
        assert!(
            sql.contains("'42501'") && sql.contains("rule \"r''x\""),
            "{sql}"
        );
        let cancelled = stand_in(&Stopped::Cancelled);
        assert_eq!(crate::policy::classify(&cancelled, &[]).unwrap().len(), 1);
        assert!(cancelled.contains("'57014'"), "{cancelled}");
    }

    #[test]
    fn notices_are_well_formed() {
        let n = notice("approval request 1");
        assert_eq!(n[0], b'N');
        let len = u32::from_be_bytes([n[1], n[2], n[3], n[4]]) as usize;
        assert_eq!(len, n.len() - 1);
        assert!(n.ends_with(b"approval request 1\0\0"));
    }
}
