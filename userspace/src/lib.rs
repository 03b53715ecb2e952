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
//! * [`secret`]: files only their reader may read (passwords, keys).
//! * [`policy`]: rules per resource and role: allow, block, mask, approval.
//! * [`audit`]: the recording interface and its sinks.
//! * [`daemon`]: `portcullis run`, start-up, reload and shutdown.
//! * [`log_batch`]: the daemon's log lines, written in batches.
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
pub mod log_batch;
pub mod policy;
pub mod protocol;
pub mod proxy;
pub mod resource;
pub mod secret;
#[cfg(test)]
mod testing;

/// Locks `mutex` whatever a panicking holder left behind: the state these
/// locks guard stays usable (queues, buffers, files), and a daemon that
/// stopped at a poisoned lock would fail every session after one panic.
pub(crate) fn lock<T: ?Sized>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    unpoisoned(mutex.lock())
}

/// What a lock operation returns, whatever a panicking holder left behind
/// (see [`lock`]): for `RwLock` reads and writes and `Condvar` waits.
pub(crate) fn unpoisoned<G>(result: std::sync::LockResult<G>) -> G {
    result.unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `e: cause: cause` in one line: for errors whose `Display` leaves the
/// cause out, and for the last word of a failed command. A cause whose text
/// the line already holds (an error that names its source in its own
/// message) is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("cannot read {path}: {source}")]
        Names {
            path: &'static str,
            source: std::io::Error,
        },
        #[error("cannot read {path}")]
        Hides {
            path: &'static str,
            source: std::io::Error,
        },
    }

    #[test]
    fn a_chain_names_each_cause_once() {
        let missing = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let names = Outer::Names {
            path: "a.toml",
            source: missing(),
        };
        assert_eq!(error_chain(&names), "cannot read a.toml: no such file");
        let hides = Outer::Hides {
            path: "a.toml",
            source: missing(),
        };
        assert_eq!(error_chain(&hides), "cannot read a.toml: no such file");
        let wrapped = anyhow::Error::from(names).context("starting");
        assert_eq!(
            error_chain(wrapped.as_ref()),
            "starting: cannot read a.toml: no such file"
        );
    }
}
