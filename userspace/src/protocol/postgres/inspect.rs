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
//! cancels it with a CancelRequest (a Query is replaced by a `DO` block
//! raising 57014; a Parse fails with it, see [`Judge`]'s `fail_parse`).
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
    lock,
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
    /// A message of the gateway's own: its reply is not the client's.
    Hidden,
    Sync,
}

type Queue = Arc<Mutex<VecDeque<Expect>>>;

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
    use crate::{
        audit::Recorder,
        identity::PrincipalKind,
        policy::runtime::Refusal,
        protocol::postgres::statements::tracker,
        testing::{random_body, Collect, Random},
    };

    /// A RowDescription of text columns.
    fn row_description(columns: &[&str]) -> Vec<u8> {
        let mut body = (columns.len() as i16).to_be_bytes().to_vec();
        for column in columns {
            cstr(column, &mut body);
            body.extend_from_slice(&0i32.to_be_bytes()); // table
            body.extend_from_slice(&1i16.to_be_bytes()); // column number
            body.extend_from_slice(&25i32.to_be_bytes()); // type: text
            body.extend_from_slice(&(-1i16).to_be_bytes()); // variable length
            body.extend_from_slice(&(-1i32).to_be_bytes()); // no modifier
            body.extend_from_slice(&0i16.to_be_bytes()); // text format
        }
        body
    }

    /// A DataRow with these cells.
    fn data_row(cells: &[&[u8]]) -> Vec<u8> {
        let mut body = (cells.len() as i16).to_be_bytes().to_vec();
        for cell in cells {
            body.extend_from_slice(&(cell.len() as i32).to_be_bytes());
            body.extend_from_slice(cell);
        }
        body
    }

    /// A few messages in one read: well-framed, with random or well-formed
    /// bodies, and now and then bytes that break the framing.
    fn random_read(random: &mut Random, kinds: &[u8], well_formed: &[Vec<u8>]) -> Vec<u8> {
        let mut data = Vec::new();
        for _ in 0..1 + random.below(4) {
            let body = match random.below(3) {
                0 => random.pick(well_formed).clone(),
                _ => random_body(random),
            };
            message(*random.pick(kinds), &body, &mut data);
        }
        if random.below(40) == 0 {
            data.extend((0..random.below(12)).map(|_| random.next() as u8));
        }
        data
    }

    /// Random traffic through the policy hook in both directions, with a
    /// block rule and masks (a detector and a column rule) in force, in
    /// reads split at random points: a broken stream is an error, never a
    /// panic that would take the session's worker down.
    #[tokio::test]
    async fn random_traffic_through_the_policy_hook_never_panics() {
        const FROM_CLIENT: &[u8] = b"QPBDECSHFdcf";
        const FROM_SERVER: &[u8] = b"123CDEIGHWcdnNstTZ";
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.toml");
        std::fs::write(
            &policy,
            r#"
[[rule]]
name = "no-drop"
commands = ["DROP"]
action = "block"
reason = "no dropping"

[[mask]]
name = "emails"
detector = "email"
style = "pseudonym"

[[mask]]
name = "cards"
columns = ["card_number"]
style = "partial"
keep_last = 4
"#,
        )
        .unwrap();
        let recorder: Arc<dyn Recorder> = Arc::new(Collect::default());
        let runtime =
            PolicyRuntime::load(Some(&policy), dir.path(), Arc::clone(&recorder)).unwrap();
        let queries = [
            b"select email, card_number from payments\0".to_vec(),
            b"copy payments to stdout\0".to_vec(),
            b"drop table t\0".to_vec(),
            b"s1\0select email from t where id = $1\0\0\0".to_vec(),
        ];
        let results = [
            row_description(&["email", "card_number"]),
            data_row(&[b"alice@example.com", b"4111111111111111"]),
            data_row(&[b"bob@example.com"]),
            b"\0\0\0\x02\0\0".to_vec(),
            b"SELECT 2\0".to_vec(),
            b"I".to_vec(),
        ];
        let mut random = Random::new(0x2545_f491_4f6c_dd1d);
        let (mut blocked, mut masked) = (0, 0);
        for _ in 0..200 {
            let guard = Guard {
                runtime: Arc::clone(&runtime),
                session: "s".into(),
                resource: "r".into(),
                principal: Principal {
                    subject: "unix:alice".into(),
                    name: "alice".into(),
                    kind: PrincipalKind::Person,
                    roles: vec!["eng".into()],
                },
                held: Arc::default(),
            };
            let (mut judge, mut results_hook) = guard.split();
            let (mut requests, mut responses, _acks) =
                tracker("s".into(), "r".into(), Arc::clone(&recorder));
            'session: for _ in 0..40 {
                let client = random.below(2) == 0;
                let data = if client {
                    random_read(&mut random, FROM_CLIENT, &queries)
                } else {
                    random_read(&mut random, FROM_SERVER, &results)
                };
                let mut rest = &data[..];
                while !rest.is_empty() {
                    let (read, after) = rest.split_at(1 + random.below(rest.len()));
                    rest = after;
                    let passed = if client {
                        let mut upstream = Vec::new();
                        let passed = judge.pass(read, &mut requests, &mut upstream).await;
                        blocked += contains(&upstream, b"RAISE EXCEPTION") as usize;
                        passed.is_ok()
                    } else {
                        match results_hook.pass(read, &mut responses) {
                            Ok(out) => {
                                masked += (out != read) as usize;
                                true
                            }
                            Err(_) => false,
                        }
                    };
                    if !passed {
                        break 'session;
                    }
                }
            }
            results_hook.finish();
        }
        assert!(
            blocked > 0 && masked > 0,
            "{blocked} blocked, {masked} masked"
        );
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

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
