//! The closed set of reasons a connection, a request or a query is
//! refused. `as_str()` is at once the `x-deny-reason` header, the metrics
//! label and the audit field; every stage that refuses names one of these.

use std::fmt;

/// Why a connection was refused. `as_str()` is at once the `x-deny-reason`
/// header, the metrics label and the audit field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Deny {
    HostNotAllowed,
    PortNotAllowed,
    UnknownSource,
    TokenInvalid,
    TokenExpired,
    TokenRevoked,
    ContainerMismatch,
    PrivateDestination,
    NoHost,
    UnsupportedProtocol,
    BadRequest,
    PeekTimeout,
    Overloaded,
    UpstreamUnreachable,
    UpstreamTimeout,
    /// A sandbox's credential placeholder where it does not belong, or a
    /// credential host reached in cleartext.
    CredentialMisuse,
    /// An inspected upstream's certificate did not verify.
    UpstreamCertificate,
    /// The request's method or path is off its host's rules.
    RequestNotAllowed,
    /// A `limits` key of the sandbox's token is reached (429 for HTTP).
    QuotaExceeded,
    /// An end reason: a live connection the sandbox's replacement token
    /// no longer allows.
    PolicyChanged,
}

impl Deny {
    pub const ALL: [Deny; 20] = [
        Deny::HostNotAllowed,
        Deny::PortNotAllowed,
        Deny::UnknownSource,
        Deny::TokenInvalid,
        Deny::TokenExpired,
        Deny::TokenRevoked,
        Deny::ContainerMismatch,
        Deny::PrivateDestination,
        Deny::NoHost,
        Deny::UnsupportedProtocol,
        Deny::BadRequest,
        Deny::PeekTimeout,
        Deny::Overloaded,
        Deny::UpstreamUnreachable,
        Deny::UpstreamTimeout,
        Deny::CredentialMisuse,
        Deny::UpstreamCertificate,
        Deny::RequestNotAllowed,
        Deny::QuotaExceeded,
        Deny::PolicyChanged,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Deny::HostNotAllowed => "host_not_allowed",
            Deny::PortNotAllowed => "port_not_allowed",
            Deny::UnknownSource => "unknown_source",
            Deny::TokenInvalid => "token_invalid",
            Deny::TokenExpired => "token_expired",
            Deny::TokenRevoked => "token_revoked",
            Deny::ContainerMismatch => "container_mismatch",
            Deny::PrivateDestination => "private_destination",
            Deny::NoHost => "no_host",
            Deny::UnsupportedProtocol => "unsupported_protocol",
            Deny::BadRequest => "bad_request",
            Deny::PeekTimeout => "peek_timeout",
            Deny::Overloaded => "overloaded",
            Deny::UpstreamUnreachable => "upstream_unreachable",
            Deny::UpstreamTimeout => "upstream_timeout",
            Deny::CredentialMisuse => "credential_misuse",
            Deny::UpstreamCertificate => "upstream_certificate",
            Deny::RequestNotAllowed => "request_not_allowed",
            Deny::QuotaExceeded => "quota_exceeded",
            Deny::PolicyChanged => "policy_changed",
        }
    }

    /// The HTTP status a denied HTTP client receives.
    pub const fn http_status(self) -> (u16, &'static str) {
        match self {
            Deny::BadRequest => (400, "Bad Request"),
            Deny::UpstreamUnreachable | Deny::UpstreamCertificate => (502, "Bad Gateway"),
            Deny::UpstreamTimeout => (504, "Gateway Timeout"),
            Deny::QuotaExceeded => (429, "Too Many Requests"),
            _ => (403, "Forbidden"),
        }
    }
}

impl fmt::Display for Deny {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_reasons_are_unique_strings() {
        let mut seen = std::collections::HashSet::new();
        for d in Deny::ALL {
            assert!(seen.insert(d.as_str()), "{d} twice");
        }
    }
}
