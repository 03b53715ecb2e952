//! Integration tests, as root, against the real kernel and real servers.
//! One binary, a module per area, shared helpers in [`harness`].

mod audit;
mod harness;
mod identity;
mod kernel;
mod pg;
mod policy;
mod postgres;
