//! The protocol-neutral shape the engine judges.
//!
//! Every adapter turns what a client asks for into [`Request`]s: the SQL
//! classifier produces one per statement, and the SSH and HTTP adapters will
//! produce one per command or request. Rules only ever look at this shape,
//! so one policy file and one engine govern every protocol.

use serde::Serialize;

use crate::identity::Principal;

/// What kind of thing a request does. A statement can be several at once
/// (`WITH d AS (DELETE ...) SELECT ...` both writes and reads).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// Reads data (SELECT, SHOW, a GET).
    Read,
    /// Changes data (INSERT, UPDATE, DELETE, MERGE, DO blocks, CALL).
    Write,
    /// Changes the schema (CREATE, ALTER, DROP, TRUNCATE).
    Ddl,
    /// Changes privileges (GRANT, REVOKE, CREATE/ALTER ROLE).
    Dcl,
    /// Moves data out in bulk (COPY TO, unbounded reads of large tables).
    Export,
    /// Session and transaction control (BEGIN, SET, ...).
    Session,
}

impl Operation {
    pub const ALL: [Operation; 6] = [
        Operation::Read,
        Operation::Write,
        Operation::Ddl,
        Operation::Dcl,
        Operation::Export,
        Operation::Session,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::Write => "write",
            Operation::Ddl => "ddl",
            Operation::Dcl => "dcl",
            Operation::Export => "export",
            Operation::Session => "session",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|op| op.name() == text)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A small set of [`Operation`]s.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Operations(u8);

impl Operations {
    pub fn insert(&mut self, op: Operation) {
        self.0 |= op.bit();
    }

    pub fn contains(self, op: Operation) -> bool {
        self.0 & op.bit() != 0
    }

    pub fn intersects(self, other: Operations) -> bool {
        self.0 & other.0 != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Operation> {
        Operation::ALL
            .into_iter()
            .filter(move |op| self.contains(*op))
    }
}

impl FromIterator<Operation> for Operations {
    fn from_iter<I: IntoIterator<Item = Operation>>(iter: I) -> Self {
        let mut set = Operations::default();
        for op in iter {
            set.insert(op);
        }
        set
    }
}

impl Serialize for Operations {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

/// One thing a principal asks a resource to do.
#[derive(Debug, Clone, Serialize)]
pub struct Request {
    /// The configured resource name (a listener or upstream name).
    pub resource: String,
    pub principal: Principal,
    /// `postgres`, `ssh`, `http`.
    pub protocol: &'static str,
    /// The command word(s): `SELECT`, `DELETE`, `DROP`, `COPY`, `GRANT`; an
    /// SSH program name; an HTTP method.
    pub command: String,
    pub operations: Operations,
    /// Objects touched (tables as `schema.table` or `table`, lower case as
    /// PostgreSQL folds them; paths; URLs).
    pub objects: Vec<String>,
    /// Columns named (lower case); `*` for a star.
    pub columns: Vec<String>,
    /// Whether the statement restricts the rows it touches (WHERE). `None`
    /// where the notion does not apply.
    pub filtered: Option<bool>,
    /// A DELETE or UPDATE anywhere in the statement without a WHERE.
    pub unfiltered_write: bool,
    /// Whether a read is bounded by LIMIT/FETCH FIRST.
    pub limited: Option<bool>,
    /// The text as the client sent it (one statement).
    pub text: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operation_sets() {
        let set: Operations = [Operation::Read, Operation::Export].into_iter().collect();
        assert!(set.contains(Operation::Export));
        assert!(!set.contains(Operation::Write));
        assert_eq!(
            set.iter().map(Operation::name).collect::<Vec<_>>(),
            ["read", "export"]
        );
        assert_eq!(Operation::parse("ddl"), Some(Operation::Ddl));
        assert_eq!(Operation::parse("nope"), None);
    }
}
