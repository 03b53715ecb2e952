//! Portcullis: a data-access gateway whose bypass protection lives in the
//! kernel.
//!
//! # Layout
//!
//! * [`config`]: the TOML configuration and its validation.
//! * [`kernel`]: eBPF programs: attach, adopt, maps, events (the only `unsafe`).
//! * [`identity`]: who is behind a session ([`identity::Principal`]).
//! * [`proxy`]: the pipeline every connection goes through (accept, identify,
//!   relay, record).
//! * [`protocol`]: the protocol adapters, the one protocol-specific step.
//! * [`audit`]: the recording interface and its sinks.
//! * [`daemon`]: `portcullis run`, start-up, reload and shutdown.
//! * [`cli`]: the command-line interface.

pub mod audit;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod identity;
pub mod kernel;
pub mod protocol;
pub mod proxy;
