//! sluice: a transparent egress gateway for sandboxed containers.
//!
//! The connection path follows the modules: [`net`] accepts and reads the
//! original destination, [`identity`] maps the source to a sandbox and its
//! verified token, [`proxy::sniff`] reads the name the client asks for,
//! [`policy`] decides, [`proxy::upstream`] resolves, guards and connects,
//! and [`proxy::relay`] moves the bytes. Beside them, the control plane:
//! [`control`] owns every change of state (tokens minted, sandboxes
//! registered, launched through [`sandbox`], unregistered, revoked,
//! reaped, reconciled), durable in [`identity::store`] and shared through
//! [`fleet`]; [`admin`] is its HTTP mapping, [`tls`] its TLS, [`rules`] the
//! gateway's packet filter. Sealed credentials: [`credentials`] holds the
//! secrets and each sandbox's placeholders, [`authority`] the inspection
//! CAs, and [`proxy::inspect`] opens TLS for the hosts that need it. And
//! [`config`], [`metrics`] and [`app`], which wires everything together.

/// An error and each of its causes, once: `a: b: c`. What every place
/// that prints a library error prints (the errors' own messages never
/// repeat their source).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

pub mod admin;
pub mod app;
pub mod authority;
pub mod config;
pub mod control;
pub mod credentials;
pub mod decision;
pub mod deny;
pub mod dns;
pub mod events;
pub mod fleet;
pub mod host;
pub mod identity;
pub mod invariants;
pub mod limits;
pub mod listener;
pub mod live;
pub mod metrics;
pub mod net;
pub mod policy;
pub mod presets;
pub mod proxy;
pub mod resolver;
pub mod rules;
pub mod sandbox;
pub mod shutdown;
pub mod suggest;
pub mod tls;
