//! What the integration tests (`tests/integration`) and the benches
//! (`userspace/benches`) both need: a throwaway child cgroup, and real
//! servers (a throwaway PostgreSQL cluster, the test OIDC provider). Each
//! is removed or stopped when dropped.
//!
//! Everything here panics with a message on failure: it runs only in tests
//! and benches, where a panic is the report.

pub mod cgroup;
pub mod oidc;
pub mod postgres;

use std::{
    net::TcpListener,
    process::{Command, Output},
};

/// A free TCP port on loopback (the listener is closed again at once, so
/// another process may take it: callers that can, retry).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Runs `program` to completion; panics with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
