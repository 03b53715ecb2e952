//! The policy relay: the [`super::relay`] with the policy engine in the
//! path, used when a policy file is configured.
//!
//! Client to server, every Query and Parse is judged before it is
//! forwarded. Allowed messages go on unchanged. A blocked one is replaced by
//! a `DO` block that raises SQLSTATE 42501 with the rule's reason, so the
//! *server* answers it, in order with everything else the client pipelined,
//! and the session (and its transaction state) stays exactly as PostgreSQL
//! would leave it after a permission error. A message that needs approval
//! is held: the client gets a NoticeResponse with the request id, and
//! nothing more from it is read until an approver decides or the request
//! times out (then it runs, or is replaced as if blocked).
//!
//! Server to client, RowDescription, DataRow, CopyOutResponse and CopyData
//! are rewritten when masks apply; every other message is copied through.
//! Responses are matched to requests with a queue, as in [`super::statements`].

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{atomic::Ordering, Arc, Mutex},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::mpsc,
};

mod framer;

use self::framer::{Framer, Piece};
use super::{
    relay::Counters,
    statements::{Requests, Responses},
    wire::Reader,
    PgError, PgStream,
};
use crate::{
    identity::Principal,
    policy::{
        runtime::{Gate, Proceed, Refusal},
        Field, Fired, PolicyRuntime, RowMasker,
    },
};

const BUFFER: usize = 64 * 1024;

/// Who is asking, where: what the policy needs for one session.
pub struct Guard {
    pub runtime: Arc<PolicyRuntime>,
    pub session: String,
    pub resource: String,
    pub principal: Principal,
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

/// Relays like [`super::relay::run`], judging and masking on the way.
pub async fn run(
    client: PgStream,
    upstream: PgStream,
    requests: Requests,
    responses: Responses,
    counters: &Counters,
    guard: Guard,
) -> Result<(), PgError> {
    let (client_read, client_write) = tokio::io::split(client);
    let (upstream_read, upstream_write) = tokio::io::split(upstream);
    let queue: Queue = Arc::default();
    let (notices, notices_rx) = mpsc::unbounded_channel();
    let fired = Mutex::new(Fired::default());
    let to_upstream = ClientHalf {
        guard: &guard,
        requests,
        queue: Arc::clone(&queue),
        notices,
        statements: HashMap::new(),
        portals: HashMap::new(),
        blocked: HashSet::new(),
    }
    .run(client_read, upstream_write, counters);
    let to_client = ServerHalf {
        responses,
        queue,
        fired: &fired,
        statement_fields: HashMap::new(),
        portal_fields: HashMap::new(),
        current: Current::default(),
    }
    .run(upstream_read, client_write, notices_rx, counters);
    let result = tokio::select! {
        result = to_upstream => result,
        result = to_client => result,
    };
    guard
        .runtime
        .record_masking(&guard.session, &guard.resource, &lock(&fired));
    result
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

/// SQL that makes the server raise 42501 with `reason`.
fn raise(refusal: &Refusal) -> String {
    let quote = |s: &str| {
        s.chars()
            .filter(|c| *c != '$' && *c != '\0')
            .collect::<String>()
            .replace('\'', "''")
    };
    format!(
        "DO $portcullis$BEGIN RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = '{}', HINT = 'refused by Portcullis policy rule \"{}\"'; END$portcullis$",
        quote(&refusal.reason),
        quote(&refusal.rule)
    )
}

struct ClientHalf<'g> {
    guard: &'g Guard,
    requests: Requests,
    queue: Queue,
    notices: mpsc::UnboundedSender<Vec<u8>>,
    /// Prepared statements: what the policy said about each.
    statements: HashMap<String, Option<Arc<Proceed>>>,
    /// Portals: their statement and result formats.
    portals: HashMap<String, (String, Vec<i16>)>,
    /// Prepared statements replaced by a refusal (their Binds are emptied).
    blocked: HashSet<String>,
}

impl ClientHalf<'_> {
    async fn run(
        mut self,
        mut from: impl AsyncRead + Unpin,
        mut to: impl AsyncWrite + Unpin,
        counters: &Counters,
    ) -> Result<(), PgError> {
        let mut framer = Framer::default();
        let mut buf = vec![0u8; BUFFER];
        let mut out = Vec::with_capacity(BUFFER);
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                let _ = to.shutdown().await;
                return Ok(());
            }
            counters.from_client.fetch_add(n as u64, Ordering::Relaxed);
            let mut at = 0;
            out.clear();
            while let Some(piece) = framer.next(&buf[..n], &mut at, |k| k != b'd')? {
                match piece {
                    Piece::Header => out.extend_from_slice(&framer.header),
                    Piece::Raw(bytes) => out.extend_from_slice(bytes),
                    Piece::Passed(_) => {}
                    Piece::Collected(kind) => {
                        let body = std::mem::take(&mut framer.body);
                        self.requests.on_message(kind, &body);
                        if kind == b'Q' || kind == b'P' {
                            // Everything before a held message goes first.
                            to.write_all(&out).await?;
                            out.clear();
                        }
                        self.on_message(kind, &body, &mut out).await;
                        framer.body = body;
                        framer.shrink();
                    }
                }
            }
            to.write_all(&out).await?;
            to.flush().await?;
            if self.requests.terminated && framer.at_boundary() {
                let _ = to.shutdown().await;
                return Ok(());
            }
        }
    }

    fn push(&self, expect: Expect) {
        lock(&self.queue).push_back(expect);
    }

    /// Judges `sql`, holding for approval if needed.
    async fn judge(&self, sql: &[u8]) -> Result<Arc<Proceed>, Refusal> {
        let g = self.guard;
        let Ok(sql) = std::str::from_utf8(sql) else {
            return Err(Refusal {
                rule: "unparseable".into(),
                reason: "the statement is not valid UTF-8; the gateway cannot judge it".into(),
            });
        };
        match g
            .runtime
            .gate_sql(&g.session, &g.resource, &g.principal, sql)
        {
            Gate::Proceed(p) => Ok(Arc::new(p)),
            Gate::Refuse(r) => Err(r),
            Gate::Hold(hold) => {
                let _ = self.notices.send(notice(&hold.notice));
                hold.resolve().await.map(Arc::new)
            }
        }
    }

    async fn on_message(&mut self, kind: u8, body: &[u8], out: &mut Vec<u8>) {
        match kind {
            b'Q' => {
                let sql = body.strip_suffix(&[0]).unwrap_or(body);
                match self.judge(sql).await {
                    Ok(proceed) => {
                        self.push(Expect::Query(Some(proceed)));
                        message(kind, body, out);
                    }
                    Err(refusal) => {
                        self.push(Expect::Query(None));
                        let mut q = Vec::new();
                        cstr(&raise(&refusal), &mut q);
                        message(b'Q', &q, out);
                    }
                }
            }
            b'P' => {
                let mut r = Reader::new(body, "Parse");
                let (Ok(name), Some(end)) = (r.cstr(), body.iter().position(|b| *b == 0)) else {
                    // Malformed: let the server refuse it.
                    message(kind, body, out);
                    return;
                };
                let rest = &body[end + 1..];
                let sql = rest.split(|b| *b == 0).next().unwrap_or_default();
                self.push(Expect::Parsed(name.clone()));
                match self.judge(sql).await {
                    Ok(proceed) => {
                        self.blocked.remove(&name);
                        self.statements.insert(name, Some(proceed));
                        message(kind, body, out);
                    }
                    Err(refusal) => {
                        let mut p = Vec::new();
                        cstr(&name, &mut p);
                        cstr(&raise(&refusal), &mut p);
                        p.extend_from_slice(&0i16.to_be_bytes());
                        message(b'P', &p, out);
                        self.statements.insert(name.clone(), None);
                        self.blocked.insert(name);
                    }
                }
            }
            b'B' => {
                let mut r = Reader::new(body, "Bind");
                let (Ok(portal), Ok(statement)) = (r.cstr(), r.cstr()) else {
                    self.push(Expect::Other);
                    message(kind, body, out);
                    return;
                };
                self.push(Expect::Bound(portal.clone()));
                let formats = result_formats(&mut r).unwrap_or_default();
                if self.blocked.contains(&statement) {
                    // The statement is now a DO block without parameters
                    // or columns: bind it with none.
                    let mut b = Vec::new();
                    cstr(&portal, &mut b);
                    cstr(&statement, &mut b);
                    b.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
                    message(b'B', &b, out);
                    self.portals.insert(portal, (statement, Vec::new()));
                } else {
                    self.portals.insert(portal, (statement, formats));
                    message(kind, body, out);
                }
            }
            b'D' => {
                let mut r = Reader::new(body, "Describe");
                match (r.u8(), r.cstr()) {
                    (Ok(b'S'), Ok(name)) => self.push(Expect::DescribeStatement(name)),
                    (Ok(_), Ok(name)) => self.push(Expect::DescribePortal(name)),
                    _ => self.push(Expect::Other),
                }
                message(kind, body, out);
            }
            b'E' => {
                let portal = Reader::new(body, "Execute").cstr().unwrap_or_default();
                let (statement, formats) = self.portals.get(&portal).cloned().unwrap_or_default();
                let proceed = self.statements.get(&statement).cloned().flatten();
                self.push(Expect::Execute {
                    proceed,
                    statement,
                    portal,
                    formats,
                });
                message(kind, body, out);
            }
            b'C' => {
                self.push(Expect::Other);
                message(kind, body, out);
            }
            b'S' => {
                self.push(Expect::Sync);
                message(kind, body, out);
            }
            b'F' => {
                // A FunctionCall names a function by OID: the gateway cannot
                // judge it, so it is refused like unparseable SQL.
                self.push(Expect::Query(None));
                let refusal = Refusal {
                    rule: "unparseable".into(),
                    reason:
                        "the fast-path function call protocol is not allowed through the gateway"
                            .into(),
                };
                let mut q = Vec::new();
                cstr(&raise(&refusal), &mut q);
                message(b'Q', &q, out);
            }
            _ => message(kind, body, out),
        }
    }
}

/// The result-column format codes of a Bind, after its name fields.
fn result_formats(r: &mut Reader<'_>) -> Result<Vec<i16>, super::wire::Malformed> {
    let n = r.i16()?.max(0) as usize;
    for _ in 0..n {
        r.i16()?;
    }
    let params = r.i16()?.max(0) as usize;
    for _ in 0..params {
        let len = r.i32()?;
        if len > 0 {
            r.bytes(len as usize)?;
        }
    }
    let n = r.i16()?.max(0) as usize;
    (0..n).map(|_| r.i16()).collect()
}

/// A RowDescription, owned.
#[derive(Clone)]
struct Column {
    name: String,
    type_oid: u32,
    format: i16,
}

fn row_description(body: &[u8]) -> Option<Vec<Column>> {
    let mut r = Reader::new(body, "RowDescription");
    let n = r.i16().ok()?.max(0) as usize;
    let mut out = Vec::with_capacity(n.min(1600));
    for _ in 0..n {
        let name = r.cstr().ok()?;
        r.bytes(6).ok()?;
        let type_oid = r.i32().ok()? as u32;
        r.bytes(6).ok()?;
        let format = r.i16().ok()?;
        out.push(Column {
            name,
            type_oid,
            format,
        });
    }
    Some(out)
}

fn masker_for(proceed: &Proceed, index: usize, columns: &[Column]) -> Option<RowMasker> {
    let fields: Vec<Field<'_>> = columns
        .iter()
        .map(|c| Field {
            name: &c.name,
            type_oid: c.type_oid,
            format: c.format,
        })
        .collect();
    proceed.rows(index, &fields)
}

/// What the server half is in the middle of: the request at the queue
/// front and how its results are masked.
#[derive(Default)]
struct Current {
    /// The front request has been looked at (masker planned).
    started: bool,
    /// For a simple Query: its plan and the index of the statement whose
    /// results are passing.
    query: Option<(Arc<Proceed>, usize)>,
    rows: Option<RowMasker>,
    copy: Option<RowMasker>,
}

struct ServerHalf<'f> {
    responses: Responses,
    queue: Queue,
    fired: &'f Mutex<Fired>,
    statement_fields: HashMap<String, Vec<Column>>,
    portal_fields: HashMap<String, Vec<Column>>,
    current: Current,
}

impl ServerHalf<'_> {
    async fn run(
        mut self,
        mut from: impl AsyncRead + Unpin,
        mut to: impl AsyncWrite + Unpin,
        mut notices: mpsc::UnboundedReceiver<Vec<u8>>,
        counters: &Counters,
    ) -> Result<(), PgError> {
        let mut framer = Framer::default();
        let mut buf = vec![0u8; BUFFER];
        let mut out = Vec::with_capacity(BUFFER + BUFFER / 2);
        let mut held_notices: Vec<Vec<u8>> = Vec::new();
        loop {
            let n = tokio::select! {
                n = from.read(&mut buf) => n?,
                Some(notice) = notices.recv() => {
                    // NoticeResponse may come at any time, but only
                    // between two messages.
                    held_notices.push(notice);
                    if framer.at_boundary() {
                        for n in held_notices.drain(..) {
                            to.write_all(&n).await?;
                        }
                        to.flush().await?;
                    }
                    continue;
                }
            };
            if n == 0 {
                let _ = to.shutdown().await;
                return Ok(());
            }
            counters.from_server.fetch_add(n as u64, Ordering::Relaxed);
            out.clear();
            self.scan(&mut framer, &buf[..n], &mut out)?;
            if framer.at_boundary() {
                for n in held_notices.drain(..) {
                    out.extend_from_slice(&n);
                }
            }
            to.write_all(&out).await?;
            to.flush().await?;
        }
    }

    /// Rewrites one read's worth of messages into `out`.
    fn scan(&mut self, framer: &mut Framer, data: &[u8], out: &mut Vec<u8>) -> Result<(), PgError> {
        let mut fired = lock(self.fired);
        let mut at = 0;
        loop {
            let (rows, copy) = (self.current.rows.is_some(), self.current.copy.is_some());
            let piece = framer.next(data, &mut at, |k| match k {
                b'D' => rows,
                b'd' => copy,
                _ => !matches!(
                    k,
                    b'N' | b'A' | b'S' | b'G' | b'W' | b'c' | b'K' | b'V' | b'v'
                ),
            })?;
            match piece {
                None => return Ok(()),
                Some(Piece::Header) => out.extend_from_slice(&framer.header),
                Some(Piece::Raw(bytes)) => out.extend_from_slice(bytes),
                Some(Piece::Passed(kind)) => self.responses.on_message(kind, &[]),
                Some(Piece::Collected(kind)) => {
                    let body = std::mem::take(&mut framer.body);
                    let result = self.on_message(kind, &body, out, &mut fired);
                    framer.body = body;
                    framer.shrink();
                    result?;
                }
            }
        }
    }

    /// The front request is answered: plan the next one.
    fn pop(&mut self) {
        lock(&self.queue).pop_front();
        self.current = Current::default();
        self.start();
    }

    /// Plans masking for the request now at the queue front.
    fn start(&mut self) {
        if self.current.started {
            return;
        }
        let q = lock(&self.queue);
        let Some(front) = q.front() else {
            return;
        };
        self.current.started = true;
        match front {
            Expect::Query(Some(p)) => self.current.query = Some((Arc::clone(p), 0)),
            Expect::Execute {
                proceed: Some(p),
                statement,
                portal,
                formats,
            } => {
                let columns = self.portal_fields.get(portal).cloned().or_else(|| {
                    self.statement_fields.get(statement).map(|cols| {
                        cols.iter()
                            .enumerate()
                            .map(|(i, c)| Column {
                                format: match formats.len() {
                                    0 => 0,
                                    1 => formats[0],
                                    _ => formats.get(i).copied().unwrap_or(0),
                                },
                                ..c.clone()
                            })
                            .collect()
                    })
                });
                // Without a description (the client never asked), only
                // the content detectors can run.
                let columns = columns.unwrap_or_default();
                self.current.rows = masker_for(p, 0, &columns);
                self.current.copy = p.copy_rows(0);
            }
            _ => {}
        }
    }

    fn front_is(&self, pred: impl Fn(&Expect) -> bool) -> bool {
        lock(&self.queue).front().is_some_and(pred)
    }

    fn on_message(
        &mut self,
        kind: u8,
        body: &[u8],
        out: &mut Vec<u8>,
        fired: &mut Fired,
    ) -> Result<(), PgError> {
        self.start();
        match kind {
            b'D' | b'd' => {
                let masker = if kind == b'D' {
                    self.current.rows.as_mut()
                } else {
                    self.current.copy.as_mut()
                };
                if let Some(m) = masker {
                    if kind == b'D' {
                        m.mask_data_row(body, out, fired)
                            .map_err(|e| PgError::Upstream(e.to_string()))?;
                    } else {
                        let mut masked = Vec::with_capacity(body.len() + 16);
                        m.mask_copy_row(body, &mut masked, fired);
                        message(kind, &masked, out);
                    }
                    self.responses.on_message(kind, &[]);
                    return Ok(());
                }
            }
            b'T' => {
                let columns = row_description(body).unwrap_or_default();
                if let Some((p, i)) = &self.current.query {
                    self.current.rows = masker_for(p, *i, &columns);
                } else {
                    let described = lock(&self.queue).front().and_then(|e| match e {
                        Expect::DescribeStatement(n) => Some((true, n.clone())),
                        Expect::DescribePortal(n) => Some((false, n.clone())),
                        _ => None,
                    });
                    if let Some((statement, name)) = described {
                        if statement {
                            self.statement_fields.insert(name, columns);
                        } else {
                            self.portal_fields.insert(name, columns);
                        }
                        self.pop();
                    }
                }
            }
            b'H' => {
                if let Some((p, i)) = &self.current.query {
                    self.current.copy = p.copy_rows(*i);
                }
            }
            b'n' if self.front_is(|e| {
                matches!(e, Expect::DescribeStatement(_) | Expect::DescribePortal(_))
            }) =>
            {
                self.pop();
            }
            b'1' | b'2' | b'3' => {
                let front = lock(&self.queue).front().map(|e| match e {
                    Expect::Parsed(name) => (Some(name.clone()), None),
                    Expect::Bound(name) => (None, Some(name.clone())),
                    _ => (None, None),
                });
                if let Some((statement, portal)) = front {
                    if let Some(name) = statement {
                        self.statement_fields.remove(&name);
                    }
                    if let Some(name) = portal {
                        self.portal_fields.remove(&name);
                    }
                    self.pop();
                }
            }
            b'C' | b'I' | b's' => {
                self.current.rows = None;
                self.current.copy = None;
                if let Some((_, i)) = self.current.query.as_mut() {
                    *i += 1;
                } else if self.front_is(|e| matches!(e, Expect::Execute { .. })) {
                    self.pop();
                }
            }
            b'E' => {
                self.current.rows = None;
                self.current.copy = None;
                if self.current.query.is_none() {
                    // Extended protocol: the server skips to the Sync.
                    let mut q = lock(&self.queue);
                    while q
                        .front()
                        .is_some_and(|e| !matches!(e, Expect::Sync | Expect::Query(_)))
                    {
                        q.pop_front();
                    }
                    drop(q);
                    self.current = Current::default();
                    self.start();
                }
            }
            b'Z' => {
                let mut q = lock(&self.queue);
                // Whatever was unanswered before the ReadyForQuery is over.
                while let Some(e) = q.pop_front() {
                    if matches!(e, Expect::Sync | Expect::Query(_)) {
                        break;
                    }
                }
                drop(q);
                self.current = Current::default();
                self.start();
            }
            _ => {}
        }
        self.responses.on_message(kind, body);
        message(kind, body, out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_cannot_break_out_of_the_do_block() {
        let sql = raise(&Refusal {
            rule: "r'$x".into(),
            reason: "it's $portcullis$; DROP TABLE t; --".into(),
        });
        let parsed = crate::policy::classify(&sql, &[]).unwrap();
        assert_eq!(parsed.len(), 1, "{sql}");
        assert_eq!(parsed[0].command, "DO");
        assert!(sql.contains("it''s portcullis; DROP TABLE t; --"), "{sql}");
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
