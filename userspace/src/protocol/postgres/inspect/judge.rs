//! Client to server: judge Query and Parse, hold or replace what the policy
//! refuses, and note what each request expects back (for [`super::Results`]).

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use tokio::{
    io::{AsyncWrite, AsyncWriteExt},
    sync::mpsc,
};

use super::{
    cstr,
    framer::{Framer, Piece},
    lock, message, notice, stand_in, Expect, Guard, Queue,
};
use crate::{
    policy::runtime::{Gate, Proceed, Refusal, Stopped},
    protocol::postgres::{
        statements::Requests,
        wire::{Malformed, Reader},
        PgError,
    },
};

/// The client-to-server half of the policy hook.
pub struct Judge {
    guard: Guard,
    queue: Queue,
    notices: mpsc::UnboundedSender<Vec<u8>>,
    /// Prepared statements: what the policy said about each.
    statements: HashMap<String, Option<Arc<Proceed>>>,
    /// Portals: their statement and result formats.
    portals: HashMap<String, (String, Vec<i16>)>,
    /// Prepared statements replaced by a stand-in (their Binds are emptied).
    blocked: HashSet<String>,
    framer: Framer,
    out: Vec<u8>,
}

impl Judge {
    pub(super) fn new(guard: Guard, queue: Queue, notices: mpsc::UnboundedSender<Vec<u8>>) -> Self {
        Self {
            guard,
            queue,
            notices,
            statements: HashMap::new(),
            portals: HashMap::new(),
            blocked: HashSet::new(),
            framer: Framer::default(),
            out: Vec::with_capacity(super::super::relay::BUFFER),
        }
    }

    /// Judges one read's worth of client messages and writes what the
    /// upstream gets to `to` (not flushed). A held message waits here, after
    /// everything before it has been flushed upstream.
    ///
    /// # Errors
    /// [`PgError::ClientProtocol`] when the client breaks the framing; I/O
    /// errors writing upstream.
    pub async fn pass(
        &mut self,
        data: &[u8],
        requests: &mut Requests,
        to: &mut (impl AsyncWrite + Unpin),
    ) -> Result<(), PgError> {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let mut at = 0;
        while let Some(piece) = self
            .framer
            .next(data, &mut at, |k| k != b'd')
            .map_err(|e| PgError::ClientProtocol(e.to_string()))?
        {
            match piece {
                Piece::Header => out.extend_from_slice(&self.framer.header),
                Piece::Raw(bytes) => out.extend_from_slice(bytes),
                Piece::Passed(_) => {}
                Piece::Collected(kind) => {
                    let body = std::mem::take(&mut self.framer.body);
                    requests.on_message(kind, &body);
                    if kind == b'X' && requests.reusable {
                        // The upstream may serve on: not told to terminate,
                        // unless something follows (it would reach the next
                        // session), as in the relay.
                        if at == data.len() {
                            self.framer.body = body;
                            break;
                        }
                        requests.reusable = false;
                    }
                    self.on_message(kind, &body, &mut out, to).await?;
                    self.framer.body = body;
                    self.framer.shrink();
                }
            }
        }
        to.write_all(&out).await?;
        self.out = out;
        Ok(())
    }

    /// True between messages.
    pub fn at_boundary(&self) -> bool {
        self.framer.at_boundary()
    }

    fn push(&self, expect: Expect) {
        lock(&self.queue).push_back(expect);
    }

    /// Judges `sql`. A message that needs approval is held: `out` is sent
    /// on first, the client told why it waits, and the wait ends with the
    /// approver's decision, the timeout or the client's CancelRequest.
    async fn judge(
        &self,
        sql: &[u8],
        out: &mut Vec<u8>,
        to: &mut (impl AsyncWrite + Unpin),
    ) -> Result<Result<Arc<Proceed>, Stopped>, PgError> {
        let g = &self.guard;
        let Ok(sql) = std::str::from_utf8(sql) else {
            return Ok(Err(Stopped::Refused(Refusal {
                rule: "unparseable".into(),
                reason: "the statement is not valid UTF-8; the gateway cannot judge it".into(),
            })));
        };
        match g
            .runtime
            .gate_sql(&g.session, &g.resource, &g.principal, sql)
        {
            Gate::Proceed(p) => Ok(Ok(Arc::new(p))),
            Gate::Refuse(r) => Ok(Err(Stopped::Refused(r))),
            Gate::Hold(hold) => {
                to.write_all(out).await?;
                to.flush().await?;
                out.clear();
                // Listen for cancels before the client learns it waits.
                let cancelled = g.held.cancelled();
                let _ = self.notices.send(notice(&hold.notice));
                Ok(hold.resolve(cancelled).await.map(Arc::new))
            }
        }
    }

    async fn on_message(
        &mut self,
        kind: u8,
        body: &[u8],
        out: &mut Vec<u8>,
        to: &mut (impl AsyncWrite + Unpin),
    ) -> Result<(), PgError> {
        match kind {
            b'Q' => {
                let sql = body.strip_suffix(&[0]).unwrap_or(body);
                match self.judge(sql, out, to).await? {
                    Ok(proceed) => {
                        self.push(Expect::Query(Some(proceed)));
                        message(kind, body, out);
                    }
                    Err(stopped) => {
                        self.push(Expect::Query(None));
                        let mut q = Vec::new();
                        cstr(&stand_in(&stopped), &mut q);
                        message(b'Q', &q, out);
                    }
                }
            }
            b'P' => {
                let mut r = Reader::new(body, "Parse");
                let (Ok(name), Some(end)) = (r.cstr(), body.iter().position(|b| *b == 0)) else {
                    // Malformed: let the server refuse it.
                    message(kind, body, out);
                    return Ok(());
                };
                let rest = &body[end + 1..];
                let sql = rest.split(|b| *b == 0).next().unwrap_or_default();
                let verdict = self.judge(sql, out, to).await?;
                if matches!(verdict, Err(Stopped::Cancelled)) {
                    self.fail_parse(&name, out);
                    return Ok(());
                }
                self.push(Expect::Parsed(name.clone()));
                match verdict {
                    Ok(proceed) => {
                        self.blocked.remove(&name);
                        self.statements.insert(name, Some(proceed));
                        message(kind, body, out);
                    }
                    Err(stopped) => {
                        parse_stand_in(&name, &stopped, out);
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
                    return Ok(());
                };
                self.push(Expect::Bound(portal.clone()));
                let formats = result_formats(&mut r).unwrap_or_default();
                if self.blocked.contains(&statement) {
                    // The statement is now a DO block without parameters
                    // or columns: bind it with none.
                    bind_without_parameters(&portal, &statement, out);
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
                let refusal = Stopped::Refused(Refusal {
                    rule: "unparseable".into(),
                    reason:
                        "the fast-path function call protocol is not allowed through the gateway"
                            .into(),
                });
                let mut q = Vec::new();
                cstr(&stand_in(&refusal), &mut q);
                message(b'Q', &q, out);
            }
            _ => message(kind, body, out),
        }
        Ok(())
    }

    /// A Parse whose approval wait was cancelled fails as PostgreSQL fails
    /// a cancelled Parse: the server answers 57014 in its place and skips
    /// to the Sync, and the client's statement name is left as it was (the
    /// unnamed statement dropped, as a Parse of it drops it first), so a
    /// later Bind of it gets 26000. The stand-in is a `DO` block prepared
    /// under [`CANCELLED_PARSE`] and run from the unnamed portal, which
    /// the failed transaction could not use anyway; the server's answers to
    /// all but its error are hidden from the client.
    fn fail_parse(&mut self, name: &str, out: &mut Vec<u8>) {
        let closed: &[&str] = match name {
            "" => &[CANCELLED_PARSE, ""],
            _ => &[CANCELLED_PARSE],
        };
        for statement in closed {
            let mut c = vec![b'S'];
            cstr(statement, &mut c);
            message(b'C', &c, out);
            self.push(Expect::Hidden);
        }
        if name.is_empty() {
            self.statements.remove("");
            self.blocked.remove("");
        }
        parse_stand_in(CANCELLED_PARSE, &Stopped::Cancelled, out);
        self.push(Expect::Hidden);
        bind_without_parameters("", CANCELLED_PARSE, out);
        self.push(Expect::Hidden);
        // Its ErrorResponse skips the queue to the Sync: nothing to expect.
        message(b'E', &[0, 0, 0, 0, 0], out);
    }
}

/// The name a cancelled Parse's stand-in is prepared under; closed before
/// each use, so one left on the server by the last does no harm.
const CANCELLED_PARSE: &str = "portcullis_cancelled_parse";

/// A Parse of `stopped`'s stand-in under `name`.
fn parse_stand_in(name: &str, stopped: &Stopped, out: &mut Vec<u8>) {
    let mut p = Vec::new();
    cstr(name, &mut p);
    cstr(&stand_in(stopped), &mut p);
    p.extend_from_slice(&0i16.to_be_bytes());
    message(b'P', &p, out);
}

/// A Bind of a stand-in, which has no parameters or columns.
fn bind_without_parameters(portal: &str, statement: &str, out: &mut Vec<u8>) {
    let mut b = Vec::new();
    cstr(portal, &mut b);
    cstr(statement, &mut b);
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    message(b'B', &b, out);
}

/// The result-column format codes of a Bind, after its name fields.
fn result_formats(r: &mut Reader<'_>) -> Result<Vec<i16>, Malformed> {
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
