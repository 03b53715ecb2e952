//! Portcullis: a data-access gateway whose bypass protection lives in the
//! kernel.
//!
//! These docs are for the engineers who work on it: build them with
//! `cargo doc --document-private-items`, whose links reach private modules.
//!
//! # Layout
//!
//! * [`config`]: the TOML configuration and its validation.
//! * [`kernel`]: eBPF programs: attach, adopt, maps, events (all the
//!   `unsafe` but one `fallocate` call in [`audit`]'s segment files).
//! * [`identity`]: who is behind a session ([`identity::Principal`]).
//! * [`control`]: the daemon's Unix control socket (login, whoami, logout).
//! * [`proxy`]: the pipeline every connection goes through (accept, identify,
//!   relay, record).
//! * [`protocol`]: the protocol adapters, the one protocol-specific step.
//! * [`resource`]: protected upstreams, their credentials and grants.
//! * [`policy`]: rules per resource and role: allow, block, mask, approval.
//! * [`audit`]: the recording interface and its sinks.
//! * [`daemon`]: `portcullis run`, start-up, reload and shutdown.
//! * [`cli`]: the command-line interface.

// Module docs name the private modules they are made of (see above).
#![allow(rustdoc::private_intra_doc_links)]

/// mimalloc rather than glibc's malloc, for the daemon and everything built
/// on this crate (benches, tests): the audit writer and sled allocate and
/// free many short-lived buffers per commit, where glibc spends its time
/// consolidating free lists (`cargo bench --bench audit`: about a quarter
/// less CPU per statement record).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod audit;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod identity;
pub mod kernel;
pub mod policy;
pub mod protocol;
pub mod proxy;
pub mod resource;
#[cfg(test)]
mod testing;
