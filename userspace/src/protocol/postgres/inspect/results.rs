//! Server to client: mask DataRow and CopyData as the judged request's
//! [`Proceed`] says, and deliver the judge's notices between messages.

use std::{collections::HashMap, sync::Arc};

use tokio::sync::mpsc;

use super::{
    framer::{Framer, Piece},
    lock, message, Expect, Queue,
};
use crate::{
    policy::{runtime::Proceed, Field, Fired, PolicyRuntime, RowMasker},
    protocol::postgres::{relay::BUFFER, statements::Responses, wire::Reader, PgError},
};

/// The server-to-client half of the policy hook.
pub struct Results {
    runtime: Arc<PolicyRuntime>,
    session: String,
    resource: String,
    queue: Queue,
    fired: Fired,
    statement_fields: HashMap<String, Vec<Column>>,
    portal_fields: HashMap<String, Vec<Column>>,
    current: Current,
    framer: Framer,
    out: Vec<u8>,
    notices: mpsc::UnboundedReceiver<Vec<u8>>,
    /// Notices waiting for a message boundary.
    pending: Vec<u8>,
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

impl Results {
    pub(super) fn new(
        runtime: Arc<PolicyRuntime>,
        session: String,
        resource: String,
        queue: Queue,
        notices: mpsc::UnboundedReceiver<Vec<u8>>,
    ) -> Self {
        Self {
            runtime,
            session,
            resource,
            queue,
            fired: Fired::default(),
            statement_fields: HashMap::new(),
            portal_fields: HashMap::new(),
            current: Current::default(),
            framer: Framer::default(),
            out: Vec::with_capacity(BUFFER + BUFFER / 2),
            notices,
            pending: Vec::new(),
        }
    }

    /// Rewrites one read's worth of server messages; returns what the
    /// client gets, with any notices that were waiting for a boundary.
    ///
    /// # Errors
    /// [`PgError::Upstream`] when the server's stream is malformed.
    pub fn pass(&mut self, data: &[u8], responses: &mut Responses) -> Result<&[u8], PgError> {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let scanned = self.scan(data, responses, &mut out);
        self.out = out;
        self.runtime.index_masked(&self.session, &mut self.fired);
        scanned?;
        if self.framer.at_boundary() {
            self.out.append(&mut self.pending);
        }
        Ok(&self.out)
    }

    /// Waits for the judge's next notice; `None` once the judge is gone.
    pub async fn notice(&mut self) -> Option<()> {
        let notice = self.notices.recv().await?;
        self.pending.extend_from_slice(&notice);
        Some(())
    }

    /// Notices that may be written now: a NoticeResponse may come at any
    /// time, but only between two messages.
    pub fn notices_now(&mut self) -> Option<Vec<u8>> {
        (self.framer.at_boundary() && !self.pending.is_empty())
            .then(|| std::mem::take(&mut self.pending))
    }

    /// True between messages.
    pub fn at_boundary(&self) -> bool {
        self.framer.at_boundary()
    }

    /// Records the session's masking totals (at its end).
    pub fn finish(&mut self) {
        self.runtime
            .record_masking(&self.session, &self.resource, &mut self.fired);
    }

    fn scan(
        &mut self,
        data: &[u8],
        responses: &mut Responses,
        out: &mut Vec<u8>,
    ) -> Result<(), PgError> {
        let mut at = 0;
        loop {
            let (rows, copy) = (self.current.rows.is_some(), self.current.copy.is_some());
            let piece = self
                .framer
                .next(data, &mut at, |k| match k {
                    b'D' => rows,
                    b'd' => copy,
                    _ => !matches!(
                        k,
                        b'N' | b'A' | b'S' | b'G' | b'W' | b'c' | b'K' | b'V' | b'v'
                    ),
                })
                .map_err(|e| {
                    PgError::Upstream(format!("malformed stream from the upstream: {e}"))
                })?;
            match piece {
                None => return Ok(()),
                Some(Piece::Header) => out.extend_from_slice(&self.framer.header),
                Some(Piece::Raw(bytes)) => out.extend_from_slice(bytes),
                Some(Piece::Passed(kind)) => responses.on_message(kind, &[]),
                Some(Piece::Collected(kind)) => {
                    let body = std::mem::take(&mut self.framer.body);
                    let result = self.on_message(kind, &body, responses, out);
                    self.framer.body = body;
                    self.framer.shrink();
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
        responses: &mut Responses,
        out: &mut Vec<u8>,
    ) -> Result<(), PgError> {
        self.start();
        let fired = &mut self.fired;
        match kind {
            b'D' | b'd' => {
                let masker = if kind == b'D' {
                    self.current.rows.as_mut()
                } else {
                    self.current.copy.as_mut()
                };
                if let Some(m) = masker {
                    fired.set_statement(responses.current_statement());
                    if kind == b'D' {
                        m.mask_data_row(body, out, fired)
                            .map_err(|e| PgError::Upstream(e.to_string()))?;
                    } else {
                        let mut masked = Vec::with_capacity(body.len() + 16);
                        m.mask_copy_row(body, &mut masked, fired);
                        message(kind, &masked, out);
                    }
                    responses.on_message(kind, &[]);
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
            b'1' | b'2' | b'3' if self.front_is(|e| matches!(e, Expect::Hidden)) => {
                self.pop();
                responses.on_message(kind, body);
                return Ok(());
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
        responses.on_message(kind, body);
        message(kind, body, out);
        Ok(())
    }
}
