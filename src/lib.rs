//! sluice: a transparent egress gateway for sandboxed containers.
//!
//! The connection path follows the modules: [`net`] accepts and reads the
//! original destination, [`identity`] maps the source to a sandbox and its
//! verified token, [`proxy::sniff`] reads the name the client asks for,
//! [`policy`] decides, [`proxy::upstream`] resolves, guards and connects,
//! and [`proxy::relay`] moves the bytes. Beside them: [`config`],
//! [`admin`], [`metrics`] and [`app`], which wires everything together.

pub mod admin;
pub mod app;
pub mod audit;
pub mod config;
pub mod decision;
pub mod deny;
pub mod dns;
pub mod host;
pub mod identity;
pub mod invariants;
pub mod metrics;
pub mod net;
pub mod policy;
pub mod proxy;
pub mod resolver;
pub mod sandbox;
pub mod shutdown;
