//! Statement tracking: pairs what the client asked (Query, or
//! Parse/Bind/Execute ... Sync) with what the upstream answered (rows,
//! command tag, error) and records one [`Statement`] event per statement.
//!
//! The client half sees requests before they are forwarded and queues what
//! it expects; the upstream half completes the queue front as responses go
//! by. Responses come back in request order, which is what makes a queue
//! enough even with pipelining.

use std::{
    borrow::Cow,
    collections::{HashMap, VecDeque},
    fmt::Write as _,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use tokio::sync::oneshot;

use super::wire::{self, Reader};
use crate::{
    audit::{Acks, AuditEvent, Recorder, Statement, StatementError},
    lock,
};

/// Longest parameter value kept in a record; longer ones are cut.
const MAX_PARAMETER: usize = 4096;

/// What the client is waiting for, in order.
enum Expect {
    /// A simple Query (or FunctionCall): one record per statement in it,
    /// each completed by its CommandComplete; ends at ReadyForQuery.
    Query {
        statements: Vec<String>,
        /// Statements recorded so far.
        done: usize,
        protocol: &'static str,
        started: Instant,
    },
    /// An Execute: ends at CommandComplete, EmptyQuery, PortalSuspended or
    /// ErrorResponse.
    Execute {
        text: Arc<str>,
        parameters: Vec<Option<String>>,
        started: Instant,
    },
    /// A Sync: ends at ReadyForQuery.
    Sync,
}

type Queue = Arc<Mutex<VecDeque<Expect>>>;

/// The client half: remembers prepared statements and portals.
pub struct Requests {
    queue: Queue,
    statements: ByName<Arc<str>>,
    portals: ByName<(Arc<str>, Vec<Option<String>>)>,
    /// Set when the client sent Terminate.
    pub terminated: bool,
    /// Set with `terminated` when nothing was outstanding and no
    /// transaction open: the upstream could serve another session.
    pub reusable: bool,
    /// The upstream's last transaction status (ReadyForQuery's byte).
    status: Arc<AtomicU8>,
}

/// The upstream half: completes statements and records them.
pub struct Responses {
    queue: Queue,
    status: Arc<AtomicU8>,
    session: String,
    resource: String,
    recorder: Arc<dyn Recorder>,
    /// Every record's acknowledgement, handed over when the session ends.
    acks: Acks,
    ledger: Option<oneshot::Sender<Acks>>,
    /// Statements completed but not yet handed to the recorder, when the
    /// caller records after forwarding (see [`Responses::defer_records`]).
    finished: Vec<AuditEvent>,
    deferred: bool,
    /// Statements recorded so far in the session.
    recorded: u64,
    rows: u64,
    rows_by_tag: Option<u64>,
    tag: Option<String>,
    error: Option<StatementError>,
}

/// Inspected client message types (all others pass untouched).
pub fn client_inspects(kind: u8) -> bool {
    matches!(kind, b'Q' | b'P' | b'B' | b'E' | b'C' | b'F')
}

/// Inspected upstream message types (ReadyForQuery for its transaction
/// status); DataRow is only counted.
pub fn upstream_inspects(kind: u8) -> bool {
    matches!(kind, b'C' | b'E' | b'Z')
}

/// The two halves of one session's tracking, and where the record
/// acknowledgements arrive when the upstream half is dropped (awaited then,
/// off the hot path).
pub fn tracker(
    session: String,
    resource: String,
    recorder: Arc<dyn Recorder>,
) -> (Requests, Responses, oneshot::Receiver<Acks>) {
    let queue: Queue = Arc::default();
    // A session starts after the login's ReadyForQuery: idle.
    let status = Arc::new(AtomicU8::new(b'I'));
    let (ledger, acks_rx) = oneshot::channel();
    (
        Requests {
            queue: Arc::clone(&queue),
            statements: ByName::default(),
            portals: ByName::default(),
            terminated: false,
            reusable: false,
            status: Arc::clone(&status),
        },
        Responses {
            queue,
            status,
            session,
            resource,
            recorder,
            acks: Acks::default(),
            ledger: Some(ledger),
            finished: Vec::new(),
            deferred: false,
            recorded: 0,
            rows: 0,
            rows_by_tag: None,
            tag: None,
            error: None,
        },
        acks_rx,
    )
}

impl Requests {
    fn push(&self, expect: Expect) {
        lock(&self.queue).push_back(expect);
    }

    /// A complete client message; malformed ones are the upstream's to
    /// refuse, the tracker only records what it can read.
    pub fn on_message(&mut self, kind: u8, body: &[u8]) {
        match kind {
            b'Q' => {
                let text = Reader::new(body, "Query").cstr().unwrap_or_default();
                self.push(Expect::Query {
                    statements: split_statements(text),
                    done: 0,
                    protocol: "simple",
                    started: Instant::now(),
                });
            }
            b'F' => self.push(Expect::Query {
                statements: vec!["<function call>".into()],
                done: 0,
                protocol: "function",
                started: Instant::now(),
            }),
            b'P' => {
                let mut r = Reader::new(body, "Parse");
                if let (Ok(name), Ok(text)) = (r.cstr_borrowed(), r.cstr_borrowed()) {
                    // Drivers re-parse the same text under the same name
                    // for every query: keep the text already held.
                    let text = match self.statements.get(&name) {
                        Some(held) if **held == *text => Arc::clone(held),
                        _ => Arc::from(text),
                    };
                    self.statements.insert(&name, text);
                }
            }
            b'B' => {
                if let Ok(Bind {
                    portal,
                    statement,
                    parameters,
                }) = parse_bind(body)
                {
                    let text = self.statements.get(&statement).cloned().unwrap_or_else(|| {
                        format!("<unknown prepared statement {statement:?}>").into()
                    });
                    self.portals.insert(&portal, (text, parameters));
                }
            }
            b'E' => {
                let portal = Reader::new(body, "Execute")
                    .cstr_borrowed()
                    .unwrap_or_default();
                let (text, parameters) = match self.portals.get(&portal) {
                    Some((text, parameters)) => (Arc::clone(text), parameters.clone()),
                    None => (format!("<unknown portal {portal:?}>").into(), Vec::new()),
                };
                self.push(Expect::Execute {
                    text,
                    parameters,
                    started: Instant::now(),
                });
            }
            b'C' => {
                let mut r = Reader::new(body, "Close");
                if let (Ok(target), Ok(name)) = (r.u8(), r.cstr_borrowed()) {
                    match target {
                        b'S' => self.statements.remove(&name),
                        _ => self.portals.remove(&name).map(|(t, _)| t),
                    };
                }
            }
            b'S' => self.push(Expect::Sync),
            b'X' => {
                self.terminated = true;
                self.reusable =
                    self.status.load(Ordering::Relaxed) == b'I' && lock(&self.queue).is_empty();
            }
            _ => {}
        }
    }
}

/// Prepared statements or portals by name. The unnamed one, which most
/// drivers use for every query, is kept beside the map: the usual
/// Parse/Bind/Execute then hashes and allocates no names.
struct ByName<T> {
    unnamed: Option<T>,
    named: HashMap<String, T>,
}

impl<T> Default for ByName<T> {
    fn default() -> Self {
        Self {
            unnamed: None,
            named: HashMap::new(),
        }
    }
}

impl<T> ByName<T> {
    fn insert(&mut self, name: &str, value: T) {
        match name {
            "" => self.unnamed = Some(value),
            _ => {
                self.named.insert(name.to_owned(), value);
            }
        }
    }

    fn get(&self, name: &str) -> Option<&T> {
        match name {
            "" => self.unnamed.as_ref(),
            _ => self.named.get(name),
        }
    }

    fn remove(&mut self, name: &str) -> Option<T> {
        match name {
            "" => self.unnamed.take(),
            _ => self.named.remove(name),
        }
    }
}

/// The statements of a simple Query, split as PostgreSQL's scanner splits
/// them (quotes, comments and dollar quoting respected). Nearly every query
/// is one statement, at most with a trailing semicolon: those skip the
/// scanner. Text the scanner cannot split stays one statement.
fn split_statements(text: String) -> Vec<String> {
    let body = text.trim_end().trim_end_matches(';');
    if !body.contains(';') {
        return vec![text];
    }
    match std::panic::catch_unwind(|| pg_query::split_with_scanner(&text)) {
        Ok(Ok(parts)) if parts.len() > 1 => parts.into_iter().map(|p| p.trim().into()).collect(),
        _ => vec![text],
    }
}

/// A Bind message, as much of it as the record needs.
struct Bind<'a> {
    portal: Cow<'a, str>,
    /// Only looked up: borrowed from the message.
    statement: Cow<'a, str>,
    /// Rendered for the record.
    parameters: Vec<Option<String>>,
}

fn parse_bind(body: &[u8]) -> Result<Bind<'_>, wire::Malformed> {
    let mut r = Reader::new(body, "Bind");
    let portal = r.cstr_borrowed()?;
    let statement = r.cstr_borrowed()?;
    let format_count = r.i16()?.max(0) as usize;
    // Read in place: one big-endian i16 per parameter (or one for all).
    let formats = r.bytes(2 * format_count)?;
    let binary = |i: usize| formats.get(2 * i..2 * i + 2) == Some(&[0, 1]);
    let count = r.i16()?.max(0) as usize;
    let mut parameters = Vec::with_capacity(count.min(body.len()));
    for i in 0..count {
        let len = r.i32()?;
        if len < 0 {
            parameters.push(None);
            continue;
        }
        let value = r.bytes(len as usize)?;
        let binary = match format_count {
            0 => false,
            1 => binary(0),
            _ => binary(i),
        };
        parameters.push(Some(render(value, binary)));
    }
    Ok(Bind {
        portal,
        statement,
        parameters,
    })
}

fn render(value: &[u8], binary: bool) -> String {
    let cut = &value[..value.len().min(MAX_PARAMETER)];
    let mut text = if binary {
        let mut hex = String::with_capacity(2 + 2 * cut.len());
        hex.push_str("\\x");
        for b in cut {
            let _ = write!(hex, "{b:02x}");
        }
        hex
    } else {
        String::from_utf8_lossy(cut).into_owned()
    };
    if cut.len() < value.len() {
        text.push_str(&format!("... ({} bytes)", value.len()));
    }
    text
}

impl Responses {
    /// Keeps completed statements until [`Responses::flush_records`], so
    /// the relay can forward a response first and record it after: the
    /// client is not kept waiting for the serialisation and hand-off.
    pub fn defer_records(&mut self) {
        self.deferred = true;
    }

    /// The number the statement whose responses pass now will be recorded
    /// under (its `statement_seq`): responses come in request order, so it
    /// is the next one to complete.
    pub fn current_statement(&self) -> u64 {
        self.recorded + 1
    }

    /// Hands the completed statements to the recorder.
    pub fn flush_records(&mut self) {
        for event in self.finished.drain(..) {
            self.acks.push(self.recorder.record(event));
        }
    }

    /// A complete upstream message (`body` only for inspected types).
    pub fn on_message(&mut self, kind: u8, body: &[u8]) {
        match kind {
            b'D' => self.rows += 1,
            b'C' => {
                let tag = Reader::new(body, "CommandComplete")
                    .cstr()
                    .unwrap_or_default();
                let rows = tag.rsplit(' ').next().and_then(|n| n.parse::<u64>().ok());
                if let Some(rows) = rows {
                    *self.rows_by_tag.get_or_insert(0) += rows;
                }
                self.tag = Some(tag);
                self.finish_statement();
            }
            b'I' | b's' => self.finish_statement(),
            b'E' => {
                let fields = wire::error_fields(body).unwrap_or_default();
                self.error = Some(StatementError {
                    sqlstate: wire::field(&fields, b'C').unwrap_or("").to_string(),
                    message: wire::field(&fields, b'M').unwrap_or("").to_string(),
                });
                if self.front_is_execute() {
                    self.finish_execute(Instant::now());
                } else if self.front_is_query() {
                    self.fail_query();
                } else if self.front_is_sync() {
                    // An error for Parse/Bind/Describe with no Execute.
                    self.error = None;
                }
            }
            b'Z' => {
                if let Some(status) = body.first() {
                    self.status.store(*status, Ordering::Relaxed);
                }
                self.ready();
            }
            _ => {}
        }
    }

    fn front_is_execute(&self) -> bool {
        matches!(self.lock().front(), Some(Expect::Execute { .. }))
    }

    fn front_is_query(&self) -> bool {
        matches!(self.lock().front(), Some(Expect::Query { .. }))
    }

    fn front_is_sync(&self) -> bool {
        matches!(self.lock().front(), Some(Expect::Sync))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Expect>> {
        lock(&self.queue)
    }

    /// A statement's end (CommandComplete, EmptyQueryResponse,
    /// PortalSuspended): the front Execute, or the next statement of the
    /// front Query.
    fn finish_statement(&mut self) {
        // One clock read ends this statement and starts the next.
        let now = Instant::now();
        let next = {
            let mut queue = self.lock();
            match queue.front_mut() {
                Some(Expect::Query {
                    statements,
                    done,
                    protocol,
                    started,
                }) => {
                    // More completions than statements (a statement the
                    // scanner could not split): charged to the last one.
                    let text = statements.get(*done).or(statements.last()).cloned();
                    *done += 1;
                    let began = std::mem::replace(started, now);
                    text.map(|text| (text, *protocol, now - began))
                }
                _ => None,
            }
        };
        match next {
            Some((text, protocol, took)) => self.record(protocol, text, Vec::new(), took),
            None => self.finish_execute(now),
        }
    }

    /// An error in a simple Query: PostgreSQL runs none of the statements
    /// after the failing one. A syntax error fails the whole text before
    /// anything runs, so it is recorded against the whole text.
    fn fail_query(&mut self) {
        let pending = {
            let mut queue = self.lock();
            let Some(Expect::Query {
                statements,
                done,
                protocol,
                started,
            }) = queue.front_mut()
            else {
                return;
            };
            let syntax = self.error.as_ref().is_some_and(|e| e.sqlstate == "42601");
            let failed: Vec<String> = if syntax && *done == 0 && statements.len() > 1 {
                vec![statements.join("; ")]
            } else {
                statements.get(*done..).unwrap_or_default().to_vec()
            };
            *done = statements.len();
            (failed, *protocol, started.elapsed())
        };
        let (failed, protocol, took) = pending;
        for (i, text) in failed.into_iter().enumerate() {
            if i > 0 {
                self.error = Some(StatementError {
                    sqlstate: String::new(),
                    message: "not executed: an earlier statement of the same query failed".into(),
                });
            }
            self.record(protocol, text, Vec::new(), took);
        }
    }

    /// Completes the front Execute, if the front is one, as of `now`.
    fn finish_execute(&mut self, now: Instant) {
        let front = {
            let mut queue = self.lock();
            match queue.front() {
                Some(Expect::Execute { .. }) => queue.pop_front(),
                _ => None,
            }
        };
        if let Some(Expect::Execute {
            text,
            parameters,
            started,
        }) = front
        {
            self.record("extended", text.to_string(), parameters, now - started);
        }
    }

    /// ReadyForQuery ends a Query or a Sync; Executes still queued before
    /// it were skipped by the upstream after an error.
    fn ready(&mut self) {
        loop {
            let front = self.lock().pop_front();
            match front {
                None | Some(Expect::Sync) => break,
                Some(Expect::Query {
                    statements,
                    done,
                    protocol,
                    started,
                }) => {
                    // A query that completed no statement (a function
                    // call, or an error) is still one record.
                    if done == 0 {
                        let text = statements.join("; ");
                        self.record(protocol, text, Vec::new(), started.elapsed());
                    }
                    break;
                }
                Some(Expect::Execute {
                    text,
                    parameters,
                    started,
                }) => {
                    self.error = Some(StatementError {
                        sqlstate: String::new(),
                        message: "not executed: an earlier message before Sync failed".into(),
                    });
                    self.record("extended", text.to_string(), parameters, started.elapsed());
                }
            }
        }
        self.reset();
    }

    fn reset(&mut self) {
        self.rows = 0;
        self.rows_by_tag = None;
        self.tag = None;
        self.error = None;
    }

    fn record(
        &mut self,
        protocol: &'static str,
        text: String,
        parameters: Vec<Option<String>>,
        took: Duration,
    ) {
        self.recorded += 1;
        let event = AuditEvent::Statement(Statement {
            session: self.session.clone(),
            statement_seq: self.recorded,
            resource: self.resource.clone(),
            protocol,
            text,
            parameters,
            duration_us: took.as_micros() as u64,
            rows_returned: self.rows,
            rows: self.rows_by_tag.or((self.rows > 0).then_some(self.rows)),
            command_tag: self.tag.take(),
            error: self.error.take(),
        });
        self.reset();
        self.finished.push(event);
        if !self.deferred {
            self.flush_records();
        }
    }
}

impl Drop for Responses {
    fn drop(&mut self) {
        self.flush_records();
        if let Some(ledger) = self.ledger.take() {
            let _ = ledger.send(std::mem::take(&mut self.acks));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{random_body, Collect, Random};

    fn statements(c: &Collect) -> Vec<Statement> {
        c.0.lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                AuditEvent::Statement(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    fn bind(portal: &str, stmt: &str, params: &[&[u8]], binary: bool) -> Vec<u8> {
        let mut b = Vec::new();
        for s in [portal, stmt] {
            b.extend_from_slice(s.as_bytes());
            b.push(0);
        }
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(&(binary as i16).to_be_bytes());
        b.extend_from_slice(&(params.len() as i16).to_be_bytes());
        for p in params {
            b.extend_from_slice(&(p.len() as i32).to_be_bytes());
            b.extend_from_slice(p);
        }
        b.extend_from_slice(&0i16.to_be_bytes());
        b
    }

    #[test]
    fn pipelined_executes_are_matched_in_order_and_skipped_after_an_error() {
        let recorder = Arc::new(Collect::default());
        let (mut req, mut resp, _acks) =
            tracker("s".into(), "r".into(), Arc::clone(&recorder) as _);
        req.on_message(b'P', b"q1\0select $1\0\0\0");
        req.on_message(b'B', &bind("", "q1", &[b"42"], false));
        req.on_message(b'E', b"\0\0\0\0\0");
        req.on_message(b'B', &bind("", "q1", &[&[1, 2]], true));
        req.on_message(b'E', b"\0\0\0\0\0");
        req.on_message(b'B', &bind("", "q1", &[b"x"], false));
        req.on_message(b'E', b"\0\0\0\0\0");
        req.on_message(b'S', b"");
        for (k, b) in [
            (b'1', &b""[..]),
            (b'2', b""),
            (b'D', b""),
            (b'C', b"SELECT 1\0"),
            (b'2', b""),
            (b'E', b"SERROR\0C22P02\0Mbad input\0\0"),
            (b'Z', b"I"),
        ] {
            resp.on_message(k, b);
        }
        let s = statements(&recorder);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].text, "select $1");
        assert_eq!(s[0].parameters, vec![Some("42".to_string())]);
        assert_eq!(s[0].rows, Some(1));
        assert_eq!(s[1].parameters, vec![Some("\\x0102".to_string())]);
        assert_eq!(s[1].error.as_ref().unwrap().sqlstate, "22P02");
        assert!(s[2]
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("not executed"));
    }

    #[test]
    fn unnamed_and_named_statements_and_portals_keep_their_own_text() {
        let recorder = Arc::new(Collect::default());
        let (mut req, mut resp, _acks) =
            tracker("s".into(), "r".into(), Arc::clone(&recorder) as _);
        // (Parse first: statement name and text, or none), Bind statement
        // into portal, Execute the portal.
        let steps = [
            (Some(("", "select 1")), "", ""),
            (Some(("", "select 1")), "", ""),
            (Some(("", "select 2")), "", ""),
            (Some(("named", "select 3")), "named", ""),
            (Some(("", "select 4")), "", "p"),
            (None, "named", "p2"),
        ];
        for (parse, statement, portal) in steps {
            if let Some((name, text)) = parse {
                let mut body = format!("{name}\0{text}\0").into_bytes();
                body.extend_from_slice(&0i16.to_be_bytes());
                req.on_message(b'P', &body);
            }
            req.on_message(b'B', &bind(portal, statement, &[], false));
            req.on_message(b'E', format!("{portal}\0\0\0\0\0").as_bytes());
        }
        // Closing the unnamed statement forgets it; the named one stays.
        req.on_message(b'C', b"S\0");
        req.on_message(b'B', &bind("", "", &[], false));
        req.on_message(b'E', b"\0\0\0\0\0");
        req.on_message(b'B', &bind("p3", "named", &[], false));
        req.on_message(b'E', b"p3\0\0\0\0\0");
        req.on_message(b'S', b"");
        for _ in 0..8 {
            resp.on_message(b'C', b"SELECT 1\0");
        }
        resp.on_message(b'Z', b"I");
        let texts: Vec<String> = statements(&recorder).into_iter().map(|s| s.text).collect();
        assert_eq!(
            texts,
            [
                "select 1",
                "select 1",
                "select 2",
                "select 3",
                "select 4",
                "select 3",
                "<unknown prepared statement \"\">",
                "select 3",
            ]
        );
    }

    #[test]
    fn multi_statement_query_is_recorded_statement_by_statement() {
        let recorder = Arc::new(Collect::default());
        let (mut req, mut resp, _acks) =
            tracker("s".into(), "r".into(), Arc::clone(&recorder) as _);
        req.on_message(
            b'Q',
            b"insert into t values (1); select ';' from t; select 1/0; select 2\0",
        );
        assert_eq!(resp.current_statement(), 1);
        resp.on_message(b'C', b"INSERT 0 1\0");
        resp.on_message(b'D', b"");
        // The rows passing belong to the statement that will be number 2.
        assert_eq!(resp.current_statement(), 2);
        resp.on_message(b'D', b"");
        resp.on_message(b'C', b"SELECT 2\0");
        resp.on_message(b'E', b"SERROR\0C22012\0Mdivision by zero\0\0");
        resp.on_message(b'Z', b"I");
        let s = statements(&recorder);
        let numbers: Vec<u64> = s.iter().map(|s| s.statement_seq).collect();
        assert_eq!(numbers, [1, 2, 3, 4]);
        assert_eq!(resp.current_statement(), 5);
        let texts: Vec<&str> = s.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                "insert into t values (1)",
                "select ';' from t",
                "select 1/0",
                "select 2"
            ]
        );
        assert_eq!(s[0].rows, Some(1));
        assert_eq!(s[1].rows_returned, 2);
        assert_eq!(s[2].error.as_ref().unwrap().sqlstate, "22012");
        assert!(s[3]
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("not executed"));
    }

    #[test]
    fn a_syntax_error_is_recorded_against_the_whole_query() {
        let recorder = Arc::new(Collect::default());
        let (mut req, mut resp, _acks) =
            tracker("s".into(), "r".into(), Arc::clone(&recorder) as _);
        req.on_message(b'Q', b"select 1; selec 2\0");
        resp.on_message(b'E', b"SERROR\0C42601\0Msyntax error\0\0");
        resp.on_message(b'Z', b"I");
        req.on_message(b'Q', b"select 'a;b';\0");
        resp.on_message(b'C', b"SELECT 1\0");
        resp.on_message(b'Z', b"I");
        let s = statements(&recorder);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].text, "select 1; selec 2");
        assert_eq!(s[0].error.as_ref().unwrap().sqlstate, "42601");
        assert_eq!(s[1].text, "select 'a;b';");
    }

    #[test]
    fn deferred_records_wait_for_flush() {
        let recorder = Arc::new(Collect::default());
        let (mut req, mut resp, _acks) =
            tracker("s".into(), "r".into(), Arc::clone(&recorder) as _);
        resp.defer_records();
        req.on_message(b'Q', b"select 1\0");
        resp.on_message(b'D', b"");
        resp.on_message(b'C', b"SELECT 1\0");
        resp.on_message(b'Z', b"I");
        assert!(statements(&recorder).is_empty());
        resp.flush_records();
        assert_eq!(statements(&recorder).len(), 1);
    }

    /// Whatever a client or server sends (the relay only checks framing),
    /// the tracker answers with records, never a panic that would take the
    /// session's worker down.
    #[test]
    fn random_messages_in_both_directions_never_panic() {
        const FROM_CLIENT: &[u8] = b"QPBDECSHXFdcfpx";
        const FROM_SERVER: &[u8] = b"123CDEIGHWcdnNAsStTZKVvx";
        let mut random = Random::new(0x9e37_79b9_7f4a_7c15);
        let recorder = Arc::new(Collect::default());
        for _ in 0..300 {
            let (mut req, mut resp, _acks) =
                tracker("s".into(), "r".into(), Arc::clone(&recorder) as _);
            if random.below(2) == 0 {
                resp.defer_records();
            }
            for _ in 0..100 {
                let body = random_body(&mut random);
                if random.below(2) == 0 {
                    req.on_message(*random.pick(FROM_CLIENT), &body);
                } else {
                    resp.on_message(*random.pick(FROM_SERVER), &body);
                }
                if random.below(50) == 0 {
                    resp.flush_records();
                }
            }
        }
        assert!(!statements(&recorder).is_empty());
    }

    #[test]
    fn malformed_bind_is_ignored_without_panic() {
        let recorder = Arc::new(Collect::default());
        let (mut req, _resp, _acks) = tracker("s".into(), "r".into(), recorder as _);
        req.on_message(b'B', b"\0\0\0\x05\0");
        req.on_message(b'B', b"");
        req.on_message(b'B', b"p\0s\0\0\0\0\x01\x7f\xff\xff\xff");
        req.on_message(b'E', b"");
    }
}
