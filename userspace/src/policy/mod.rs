//! Policy: what a principal may do on a resource, decided per statement,
//! command or request, independent of the protocol.
//!
//! # Layout
//!
//! * [`file`](mod@file): the policy file (TOML), validated with line-numbered errors.
//! * [`request`]: the protocol-neutral [`Request`] every adapter produces.
//! * [`sql`]: PostgreSQL statements to requests, with PostgreSQL's parser.
//! * [`engine`]: rules to a [`Decision`] (allow, block, mask, approval).
//! * [`detect`], [`mask`], [`stream`]: finding personal data and masking it
//!   in DataRow and COPY streams.
//! * [`approval`]: held requests, approver decisions, time-window grants;
//!   [`control`] serves them to `portcullis approvals` on a Unix socket and
//!   [`webhook`] announces them.
//! * [`runtime`]: the live policy, its reloads, and what adapters call.

pub mod approval;
pub mod control;
pub mod detect;
pub mod engine;
pub mod file;
pub mod mask;
pub mod request;
pub mod runtime;
pub mod sql;
pub mod stream;
pub mod webhook;

pub use approval::{ApprovalOutcome, ApprovalStore};
pub use engine::{combine, ApprovalScope, Approvers, Decision, Grants, NoGrants, Verdict};
pub use file::{FileError, Policy};
pub use request::{Operation, Operations, Request};
pub use runtime::PolicyRuntime;
pub use sql::{classify, SqlError, Statement};
pub use stream::{Field, Fired, RowMasker, StreamError};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid policy file {path}: {source}")]
    Invalid { path: PathBuf, source: FileError },
    #[error(transparent)]
    Key(#[from] mask::KeyError),
    #[error(transparent)]
    Control(#[from] control::ControlError),
}
