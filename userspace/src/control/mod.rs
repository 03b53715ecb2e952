//! The daemon's Unix control socket: `portcullis login`, `whoami` and
//! `logout` talk to the running daemon through it.
//!
//! Who is asking is never taken from the request: the server reads the
//! caller's uid from the kernel (SO_PEERCRED), so the socket can be
//! world-connectable (0666) and a user can only ever bind, inspect or end
//! their own identity.
//!
//! The wire format is one JSON [`Request`] line, answered by one JSON
//! [`Response`] line, then the connection closes.

mod client;
pub mod commands;
mod server;

use serde::{Deserialize, Serialize};

pub use client::request;
pub use server::{bind, serve};

use crate::identity::{BindingInfo, LoginParams, LoginTokens};

/// Largest request accepted: three tokens fit many times over.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error(
        "cannot reach the gateway at {path}: {error} (is the daemon running with an [identity] section? \
         pass --socket or set PORTCULLIS_CONTROL_SOCKET if it listens elsewhere)"
    )]
    Connect { path: String, error: std::io::Error },
    #[error("another process already serves the control socket {0}: stop it first")]
    InUse(String),
    #[error("malformed control message: {0}")]
    Protocol(String),
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Which provider and client to sign in with.
    LoginParams,
    /// Bind the identity in these tokens to the caller's uid.
    Login(LoginTokens),
    Whoami,
    Logout,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    LoginParams(LoginParams),
    Bound(BindingInfo),
    /// `whoami`/`logout` for a uid without a binding.
    NotBound {
        uid: u32,
    },
    LoggedOut(BindingInfo),
    Error {
        message: String,
    },
}
