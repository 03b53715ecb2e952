//! The proxy: one pipeline for every protocol.
//!
//! A connection goes through the same steps whatever it speaks:
//!
//! 1. **accept** ([`listener`]): a bounded number of concurrent sessions,
//!    on the [`workers`]' threads.
//! 2. **identify** ([`session`]): the kernel's record of the connect() gives
//!    the original destination and the uid/pid/command behind it; a
//!    connection without one is refused.
//! 3. **relay** ([`crate::protocol`]): the protocol adapter talks to the
//!    client and to the upstream, which the gateway reaches with its
//!    exemption mark ([`upstream`]).
//! 4. **record**: session start and end go to the [`Recorder`].
//!
//! Authorization and inspection slot in between identify and relay as the
//! identity and policy layers land.

mod listener;
mod session;
mod shutdown;
pub mod upstream;
mod workers;

use std::sync::{Arc, RwLock};

pub use listener::{bind, BoundListener};
pub use shutdown::{Shutdown, ShutdownSignal};
pub use workers::Workers;

use crate::{
    audit::Recorder,
    identity::IdentityProvider,
    kernel::{ConnectionTable, FastPath},
    protocol::postgres::PostgresGateway,
    unpoisoned,
};

/// What every session needs from the gateway.
pub struct Gateway {
    pub recorder: Arc<dyn Recorder>,
    pub connections: Arc<ConnectionTable>,
    /// The kernel fast path for local clients, unless turned off.
    pub fast_path: Option<Arc<FastPath>>,
    pub identity: Arc<dyn IdentityProvider>,
    /// SO_MARK for upstream sockets, so the kernel lets them through.
    pub exempt_mark: u32,
    /// Resources, listener certificates and cancel keys of the PostgreSQL
    /// adapter; replaced as a whole on reload.
    pub postgres: RwLock<Arc<PostgresGateway>>,
    /// The policy in force, when a policy file is configured.
    pub policy: Option<Arc<crate::policy::PolicyRuntime>>,
}

impl Gateway {
    /// The PostgreSQL configuration in force now.
    pub fn postgres(&self) -> Arc<PostgresGateway> {
        Arc::clone(&*unpoisoned(self.postgres.read()))
    }

    /// Puts a reloaded PostgreSQL configuration in force for new sessions.
    pub fn set_postgres(&self, postgres: PostgresGateway) {
        *unpoisoned(self.postgres.write()) = Arc::new(postgres);
    }
}
