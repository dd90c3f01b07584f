//! The one decision every door makes: may this caller reach this target?
//! A caller is a registered sandbox (found by its source address) or the
//! credentials a proxy client presented; a target is a host and a port.
//! [`Decision::authorize`] checks the token (still valid, not revoked, the
//! container binding) and the allowlist; [`Decision::decide`] does that and
//! takes one connection slot from the container's one counter, and returns
//! the [`Permit`] a connection holds for its life: the grant, the watch
//! that fires when the token is revoked (or the sandbox unregistered), and
//! the slot.
//!
//! [`Decision::authorize_name`] is the DNS door's form of the same
//! question: may the caller reach this name on any port.
//!
//! Synchronous and free of I/O: the doors (transparent, proxy, and the DNS
//! door) call it; they never compose a decision of their own.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tokio_util::sync::CancellationToken;

use crate::config::GatewayConfig;
use crate::deny::Deny;
use crate::host::Host;
use crate::identity::token::{Grant, Verifier};
use crate::identity::{ConnectionCounts, CountGuard, Sandbox};
use crate::live::{Admitted, Tenants};

/// Who is asking.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A registered sandbox, identified by the connection's source address.
    Sandbox(Arc<Sandbox>),
    /// A proxy client's `Proxy-Authorization`.
    Credentials(Credentials),
    /// A connection already admitted, asking again (each request of an
    /// HTTP connection, a tunnel's next target): the grant it runs under
    /// now, which a token replacement swaps, still valid and not revoked.
    Live(Arc<crate::live::LiveConn>),
}

/// What `Proxy-Authorization` carried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// `Basic base64(container_<ID>:jwt_<TOKEN>)`, as `HTTP_PROXY` userinfo
    /// makes clients send.
    Basic {
        container_id: Option<String>,
        token: String,
    },
    /// `Bearer <TOKEN>`.
    Bearer(String),
}

impl Credentials {
    /// Parses a `Proxy-Authorization` value; `None` if it is unusable.
    pub fn parse(value: &str) -> Option<Credentials> {
        let (scheme, rest) = value.trim().split_once(' ')?;
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            return (!rest.is_empty()).then(|| Credentials::Bearer(rest.to_owned()));
        }
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = STANDARD.decode(rest).ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (user, pass) = decoded.split_once(':')?;
        let token = pass.strip_prefix("jwt_").unwrap_or(pass);
        if token.is_empty() {
            return None;
        }
        let id = user.strip_prefix("container_").unwrap_or(user);
        Some(Credentials::Basic {
            container_id: (!id.is_empty()).then(|| id.to_owned()),
            token: token.to_owned(),
        })
    }

    fn token(&self) -> &str {
        match self {
            Credentials::Basic { token, .. } | Credentials::Bearer(token) => token,
        }
    }
}

/// Where the caller wants to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: Host,
    pub port: u16,
}

/// An allowed target, before a connection slot is taken.
#[derive(Debug, Clone)]
pub struct Authorized {
    pub grant: Arc<Grant>,
    /// An allowlist entry names this port explicitly: a protocol that
    /// carries no name (SSH, a database) may pass.
    pub explicit_port: bool,
    /// Only entries with request rules admit it: each request is judged
    /// by them, and what cannot be read is refused.
    pub restricted: bool,
    /// The allowlist entry that admitted it, by index.
    pub entry: Option<usize>,
    /// A report-mode sandbox's allowlist denial, let through.
    pub would_deny: Option<Deny>,
}

impl Authorized {
    /// Is the sandbox's token in report mode?
    pub fn reports(&self) -> bool {
        self.grant.claims.enforce == crate::identity::token::Enforce::Report
    }

    /// The request rules' word on one request: `Ok(None)` admitted (or
    /// unrestricted), `Ok(Some(deny))` a report-mode sandbox's refusal let
    /// through, `Err` refused. A path that cannot be normalised is refused
    /// in report mode too: that is hostile input, not policy.
    pub fn request(
        &self,
        target: &Target,
        allowed_ports: &[u16],
        method: &str,
        path: &str,
    ) -> Result<Option<Deny>, Deny> {
        if !self.restricted {
            return Ok(None);
        }
        match self.grant.allowlist.admits_request(
            &target.host,
            target.port,
            allowed_ports,
            method,
            path,
        ) {
            Ok(()) => Ok(None),
            Err(d @ Deny::RequestNotAllowed) if self.reports() => Ok(Some(d)),
            Err(d) => Err(d),
        }
    }

    /// The entry that admitted it, as written.
    pub fn matched(&self) -> Option<String> {
        self.entry.and_then(|i| self.grant.allowlist.entry_text(i))
    }
}

/// What an allowed connection holds for its life.
pub struct Permit {
    pub grant: Arc<Grant>,
    pub explicit_port: bool,
    /// See [`Authorized::restricted`].
    pub restricted: bool,
    /// See [`Authorized::would_deny`].
    pub would_deny: Option<Deny>,
    /// See [`Authorized::entry`].
    pub entry: Option<usize>,
    /// Cancelled when the token is revoked, the sandbox unregistered or
    /// the token expires, or the connection alone is closed (a token
    /// replacement that no longer allows it, a spent budget): the
    /// connection closes.
    pub revoked: CancellationToken,
    pub slot: CountGuard,
    /// Its entry among its sandbox's live connections, and its meter.
    pub live: Admitted,
}

impl Permit {
    pub fn container_id(&self) -> &str {
        &self.grant.claims.container_id
    }
}

/// The decision's inputs that are not the caller or the target.
pub struct Decision<'a> {
    pub verifier: &'a Verifier,
    pub connections: &'a Arc<ConnectionCounts>,
    pub tenants: &'a Tenants,
    pub gateway: &'a GatewayConfig,
}

impl Decision<'_> {
    /// The caller's current grant: its token verified (from the cache in
    /// the common case), not revoked, and bound to the container it names.
    pub fn grant(&self, caller: &Caller) -> Result<Arc<Grant>, Deny> {
        match caller {
            Caller::Sandbox(s) => s.current_grant(self.verifier),
            Caller::Live(c) => {
                let grant = c.grant();
                if grant.expired_at(crate::identity::token::now_s(), self.verifier.leeway()) {
                    return Err(Deny::TokenExpired);
                }
                if self.verifier.is_revoked(&grant.claims.jti) {
                    return Err(Deny::TokenRevoked);
                }
                Ok(grant)
            }
            Caller::Credentials(creds) => {
                let grant = self.verifier.verify(creds.token()).map_err(|e| e.deny())?;
                if grant.claims.enforce_container_binding.0 {
                    let named = match creds {
                        Credentials::Basic { container_id, .. } => container_id.as_deref(),
                        // A bearer token carries no separate name: the claim is it.
                        Credentials::Bearer(_) => Some(grant.claims.container_id.as_str()),
                    };
                    if named != Some(grant.claims.container_id.as_str()) {
                        return Err(Deny::ContainerMismatch);
                    }
                }
                Ok(grant)
            }
        }
    }

    /// May `caller` reach `target`? No slot is taken (a later request on a
    /// connection that holds one, or a DNS query).
    pub fn authorize(&self, caller: &Caller, target: &Target) -> Result<Authorized, Deny> {
        let grant = self.grant(caller)?;
        let admitted =
            match grant
                .allowlist
                .decide(&target.host, target.port, &self.gateway.allowed_ports)
            {
                Ok(a) => a,
                // Report mode: an allowlist denial is let through, recorded.
                Err(d @ (Deny::HostNotAllowed | Deny::PortNotAllowed))
                    if grant.claims.enforce == crate::identity::token::Enforce::Report =>
                {
                    return Ok(Authorized {
                        grant,
                        explicit_port: false,
                        restricted: false,
                        entry: None,
                        would_deny: Some(d),
                    });
                }
                Err(d) => return Err(d),
            };
        Ok(Authorized {
            grant,
            explicit_port: admitted.explicit_port,
            restricted: admitted.restricted,
            entry: admitted.entry,
            would_deny: None,
        })
    }

    /// May `caller` reach `host` on some port? The DNS door's question;
    /// a report-mode sandbox's denial is let through, with its reason.
    pub fn authorize_name(
        &self,
        caller: &Caller,
        host: &Host,
    ) -> Result<(Arc<Grant>, Option<Deny>), Deny> {
        let grant = self.grant(caller)?;
        if grant.allowlist.admits_name(host) {
            Ok((grant, None))
        } else if grant.claims.enforce == crate::identity::token::Enforce::Report {
            Ok((grant, Some(Deny::HostNotAllowed)))
        } else {
            Err(Deny::HostNotAllowed)
        }
    }

    /// What the gateway would decide for `caller` and `target`, and the
    /// allowlist entry that admitted it: `sluice explain` and
    /// `GET /v1/explain`, from the same [`authorize`](Self::authorize) the
    /// doors call.
    pub fn explain(
        &self,
        caller: &Caller,
        target: &Target,
        request: Option<(&str, &str)>,
    ) -> Explanation {
        let presets = match self.grant(caller) {
            Ok(grant) => grant.allowlist.preset_expansions(),
            Err(d) => {
                return Explanation {
                    decision: Err(d),
                    matched: None,
                    presets: Default::default(),
                    would_deny: None,
                };
            }
        };
        let denied = |d: Deny| Explanation {
            decision: Err(d),
            matched: None,
            presets: presets.clone(),
            would_deny: None,
        };
        let a = match self.authorize(caller, target) {
            Ok(a) => a,
            Err(d) => return denied(d),
        };
        let ports = &self.gateway.allowed_ports;
        let list = &a.grant.allowlist;
        // A request to a host only rules admit: the rule that admits it.
        if let Some((method, path)) = request
            && a.restricted
        {
            let would_deny = match a.request(target, ports, method, path) {
                Ok(w) => w,
                Err(d) => return denied(d),
            };
            return Explanation {
                decision: Ok(()),
                matched: list.matched_request(&target.host, target.port, ports, method, path),
                presets,
                would_deny,
            };
        }
        Explanation {
            decision: Ok(()),
            matched: list.matched(&target.host, target.port, ports),
            presets,
            would_deny: a.would_deny,
        }
    }

    /// [`authorize`](Self::authorize), then one connection slot from the
    /// container's counter (`overloaded` when it holds its share).
    pub fn decide(&self, caller: &Caller, target: &Target) -> Result<Permit, Deny> {
        let Authorized {
            grant,
            explicit_port,
            restricted,
            entry,
            would_deny,
        } = self.authorize(caller, target)?;
        let slot = self
            .connections
            .try_acquire(&grant.container, self.gateway.max_connections_per_sandbox)
            .ok_or(Deny::Overloaded)?;
        let live = self.admit(&grant, target)?;
        Ok(Permit {
            revoked: live.conn.closed.clone(),
            grant,
            explicit_port,
            restricted,
            would_deny,
            entry,
            slot,
            live,
        })
    }

    /// One live connection of the grant's sandbox, within its limits.
    pub fn admit(&self, grant: &Arc<Grant>, target: &Target) -> Result<Admitted, Deny> {
        self.tenants
            .admit(grant, (target.host.clone(), target.port), self.verifier)
    }
}

/// A decision, explained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub decision: Result<(), Deny>,
    /// The entry that admitted the target, as written (with the preset it
    /// came from).
    pub matched: Option<String>,
    /// What each preset the token names stands for, entry by entry.
    pub presets: std::collections::BTreeMap<String, Vec<String>>,
    /// A report-mode sandbox's denial, which would be let through.
    pub would_deny: Option<Deny>,
}

impl Explanation {
    /// `allow`, `deny` or `would_deny`, and the reason.
    pub fn verdict(&self) -> (&'static str, &'static str) {
        let (v, reason) = crate::events::Verdict::of(self.decision, self.would_deny);
        (v.as_str(), reason)
    }

    pub fn to_json(&self) -> serde_json::Value {
        let (decision, reason) = self.verdict();
        let mut out =
            serde_json::json!({"decision": decision, "reason": reason, "matched": self.matched});
        if !self.presets.is_empty() {
            out["presets"] = serde_json::json!(self.presets);
        }
        out
    }
}

/// Denies that are about credentials: the proxy answers them `407`.
pub fn is_auth_failure(d: Deny) -> bool {
    matches!(
        d,
        Deny::TokenInvalid | Deny::TokenExpired | Deny::TokenRevoked | Deny::ContainerMismatch
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(s: &str) -> String {
        format!("Basic {}", STANDARD.encode(s))
    }

    #[test]
    fn credentials_in_the_original_designs_shape() {
        assert_eq!(
            Credentials::parse(&basic("container_sb1:jwt_abc.def.ghi")),
            Some(Credentials::Basic {
                container_id: Some("sb1".into()),
                token: "abc.def.ghi".into()
            })
        );
        assert_eq!(
            Credentials::parse("Bearer abc.def.ghi"),
            Some(Credentials::Bearer("abc.def.ghi".into()))
        );
        assert_eq!(
            Credentials::parse("bearer  abc "),
            Some(Credentials::Bearer("abc".into()))
        );
        for bad in [
            "",
            "Basic",
            "Basic !!!",
            "Digest x",
            "Bearer ",
            &basic("nocolon"),
            &basic("container_x:jwt_"),
            &basic("container_x:"),
        ] {
            assert_eq!(Credentials::parse(bad), None, "{bad:?}");
        }
    }
}
