//! The `sluice` command: parses the command line, sets up logging, raises
//! the descriptor limit, loads the config and calls into the library.
//! Exit codes: 0 ok, 1 runtime failure or rejected input, 2 usage error.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use sluice::config::Config;
use sluice::identity::token::{Jwks, KeyPair, MintRequest, Signer, Verifier};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Transparent egress gateway for sandboxed containers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (embedded defaults without --config).
    Serve {
        /// The TOML config file; without it, state in ./.sluice and every
        /// listener on 127.0.0.1.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Write an ES256 key pair and its JWKS into a directory.
    Keygen {
        /// The directory for private-key.pem (0600), public-key.pem and jwks.json.
        #[arg(long)]
        out: PathBuf,
        /// The key id, named in every token's header and in the JWKS.
        #[arg(long, default_value = "sluice-1")]
        kid: String,
    },
    /// Mint or verify tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The decision the gateway would make for a token and a target, and
    /// the allowlist entry that matched (exit 0 allowed, 1 denied).
    Explain {
        /// The gateway's config (its keys, presets, ports); defaults
        /// without it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The sandbox's token.
        #[arg(long)]
        token: String,
        /// The host the sandbox would reach (a name or an IP; `host:port`
        /// works too).
        #[arg(long)]
        host: String,
        /// The port (default: the one in --host, else 443).
        #[arg(long)]
        port: Option<u16>,
        /// A request's method: the request is judged by the host's
        /// request rules, and the rule that admits it is named.
        #[arg(long)]
        method: Option<String>,
        /// The request's path (default `/`; needs --method).
        #[arg(long, requires = "method")]
        path: Option<String>,
    },
    /// Validate a config file: every error, each with its key.
    Check {
        /// The TOML config file to check.
        #[arg(long)]
        config: PathBuf,
    },
    /// The gateway's iptables rules for the sandboxes behind one interface
    /// or subnet, in this network namespace (the same rules as
    /// iptables/sluice-gateway.sh, applied as one batch).
    Rules(RulesArgs),
    /// Allowlists from what sandboxes did.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Print an `allowed_hosts` value (JSON: the value, and each entry with
    /// what it covers and its counts) from what the sandbox reached, as the
    /// gateway last saved it in its state directory (every 5 s).
    Suggest {
        /// The gateway's config (its state_dir and allowed_ports);
        /// defaults without it.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        container_id: String,
        /// Also the hosts an enforcing sandbox was refused by its
        /// allowlist (by default only what it reached, or in report mode
        /// would have been refused).
        #[arg(long)]
        include_denied: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RulesAction {
    /// Install the rules (replacing the target's earlier ones).
    Apply,
    /// Remove every rule of the target.
    Remove,
    /// Print what is installed for the target (exit 1 if not applied).
    Status,
    /// Admit one more --bind IP=MAC on rules applied with L2 chains.
    Bind,
    /// No longer admit one --bind IP=MAC.
    Unbind,
}

#[derive(clap::Args)]
struct RulesArgs {
    /// What to do.
    action: RulesAction,
    /// The sandbox-facing interface (a veth, or a bridge several share).
    #[arg(long, required_unless_present = "subnet", conflicts_with = "subnet")]
    iface: Option<String>,
    /// An IPv4 subnet of sandbox sources, on any interface.
    #[arg(long)]
    subnet: Option<String>,
    /// The transparent listener TCP is REDIRECTed to.
    #[arg(long, default_value_t = 15001)]
    port: u16,
    /// The explicit proxy port, let through to the gateway's own addresses.
    #[arg(long)]
    proxy_port: Option<u16>,
    /// The DNS door port 53 (UDP and TCP) is REDIRECTed to.
    #[arg(long)]
    dns_port: Option<u16>,
    /// With --iface: the one source address the interface may send from.
    #[arg(long)]
    source: Option<std::net::Ipv4Addr>,
    /// Admit this address only from this MAC (IPv4 and ARP); repeatable.
    #[arg(long = "bind", value_name = "IP=MAC")]
    binds: Vec<String>,
    /// L2 chains with no binding yet: sluice binds at registration.
    #[arg(long)]
    bind_dynamic: bool,
    /// The network below already prevents address spoofing.
    #[arg(long)]
    l2_trusted: bool,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print one ES256 JWT on stdout.
    Mint {
        /// The private key (PEM, PKCS#8), as `keygen` writes it.
        #[arg(long)]
        key: PathBuf,
        /// The key id put in the token's header (as `keygen --kid`).
        #[arg(long, default_value = "sluice-1")]
        kid: String,
        /// The sandbox the token is for (claim `container_id`).
        #[arg(long)]
        container_id: String,
        /// Who the sandbox runs for (claim `user_id`).
        #[arg(long)]
        user_id: String,
        /// Comma-separated allowlist entries: name, *.suffix, host:port, IP.
        #[arg(long, value_delimiter = ',', required = true)]
        allow: Vec<String>,
        /// Lifetime: 90s, 30m, 4h, 2d, or plain seconds.
        #[arg(long, default_value = "4h", value_parser = parse_ttl)]
        ttl: Duration,
        /// The issuer claim; the gateway's `auth.issuer` must match.
        #[arg(long, default_value = "secure-egress-control")]
        issuer: String,
        /// The audience claim; the gateway's `auth.audience` must match.
        #[arg(long, default_value = "egress-proxy")]
        audience: String,
        /// A gateway config whose `[presets]` the `@name` entries may use
        /// (the built-in ones are always known).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Claim `limits`, as JSON: `{"egress_bytes_per_s":1048576,...}`.
        #[arg(long, value_parser = parse_limits)]
        limits: Option<Box<sluice::limits::Limits>>,
        /// Claim `organization_uuid`.
        #[arg(long)]
        organization_uuid: Option<String>,
    },
    /// Print a token's verified claims as JSON (exit 1 with the reason).
    Verify {
        /// The JWKS to verify against (several keys: chosen by kid).
        #[arg(long)]
        jwks: PathBuf,
        /// The issuer the token must name.
        #[arg(long, default_value = "secure-egress-control")]
        issuer: String,
        /// The audience the token must name.
        #[arg(long, default_value = "egress-proxy")]
        audience: String,
        /// Seconds of clock skew allowed on exp and nbf.
        #[arg(long, default_value_t = 30)]
        leeway: u64,
        /// The token (a JWT).
        token: String,
    },
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a duration"))?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        "d" => n.checked_mul(86_400),
        _ => None,
    }
    .ok_or_else(|| format!("{s:?} is not a duration (use s, m, h or d)"))?;
    if secs == 0 {
        return Err("the ttl must be positive".into());
    }
    Ok(Duration::from_secs(secs))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve(config.as_deref()),
        Command::Keygen { out, kid } => keygen(&out, &kid),
        Command::Token(cmd) => token(cmd),
        Command::Check { config } => check(&config),
        Command::Rules(args) => rules(args),
        Command::Policy(PolicyCommand::Suggest {
            config,
            container_id,
            include_denied,
        }) => policy_suggest(config.as_deref(), &container_id, include_denied),
        Command::Explain {
            config,
            token,
            host,
            port,
            method,
            path,
        } => {
            let request = method
                .as_deref()
                .map(|m| (m, path.as_deref().unwrap_or("/")));
            explain(config.as_deref(), &token, &host, port, request)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sluice: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Raises the descriptor limit as far as this process may: to the
/// kernel's `nr_open` where it can raise the hard limit (CAP_SYS_RESOURCE),
/// else the soft limit to the hard one. Every relayed connection holds two
/// sockets and, while bytes flow, two pipes.
fn raise_nofile() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => return tracing::warn!(error = %e, "cannot read RLIMIT_NOFILE"),
    };
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(hard);
    if nr_open > hard && setrlimit(Resource::RLIMIT_NOFILE, nr_open, nr_open).is_ok() {
        return;
    }
    if soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(error = %e, soft, hard, "cannot raise RLIMIT_NOFILE");
    }
}

fn serve(config_path: Option<&Path>) -> anyhow::Result<ExitCode> {
    init_tracing();
    raise_nofile();
    let config = match config_path {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    tracing::debug!(config = %serde_json::to_string(&config).unwrap_or_default(), "configuration");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        // Before anything else, so a SIGHUP or SIGTERM from the moment
        // systemd hears READY=1 (or during start) is handled, never the
        // default action of ending the process.
        let signals = Signals::new()?;
        let running = sluice::app::run(config, sluice::app::Options::default()).await?;
        eprintln!(
            "sluice: transparent {} proxy {} dns {} admin {} metrics {}",
            running.transparent_addr,
            running.proxy_addr,
            running.dns_addr,
            running.admin_addr,
            running.metrics_addr
        );
        // Under systemd (`Type=notify`): listening and serving now.
        notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status("serving"),
        ]);
        wait_for_stop(signals, &running, config_path).await;
        notify(&[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("draining live connections"),
        ]);
        tracing::info!("shutting down: draining live connections");
        let cut = running.shutdown().await;
        tracing::info!(cut, "stopped");
        Ok(ExitCode::SUCCESS)
    })
}

/// The signals `serve` handles, taken over from their default actions.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
        })
    }
}

/// Waits for SIGTERM or SIGINT. SIGHUP on the way reloads the JWKS, the
/// TLS certificates and, with a config file, its `[gateway]` policy; a
/// broken file changes nothing.
async fn wait_for_stop(
    signals: Signals,
    running: &sluice::app::Running,
    config_path: Option<&Path>,
) {
    let Signals {
        mut term,
        mut int,
        mut hup,
    } = signals;
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                // systemd 253 and later want MONOTONIC_USEC with RELOADING.
                match sd_notify::NotifyState::monotonic_usec_now() {
                    Ok(now) => notify(&[sd_notify::NotifyState::Reloading, now]),
                    Err(_) => notify(&[sd_notify::NotifyState::Reloading]),
                }
                let _ = running.reload();
                for e in running.reload_tls() {
                    tracing::warn!(error = %sluice::error_chain(&e), "TLS files not reloaded; the last good set stays");
                }
                if let Some(path) = config_path {
                    match Config::load(path).map(|c| running.reload_config(&c)) {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) | Err(e) => tracing::warn!(error = %sluice::error_chain(&e), "config not reloaded"),
                    }
                }
                notify(&[sd_notify::NotifyState::Ready]);
            }
        }
    }
}

/// Tells systemd (when `NOTIFY_SOCKET` is set; otherwise nothing) how the
/// service stands. A failure to tell it is logged, never fatal.
fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// `--limits`: the claim's JSON.
fn parse_limits(s: &str) -> Result<Box<sluice::limits::Limits>, String> {
    let limits: sluice::limits::Limits =
        serde_json::from_str(s).map_err(|e| format!("not a limits object: {e}"))?;
    limits.validate()?;
    Ok(Box::new(limits))
}

fn keygen(out: &Path, kid: &str) -> anyhow::Result<ExitCode> {
    if kid.is_empty() {
        bail!("--kid must not be empty");
    }
    let pair = KeyPair::generate(kid)?;
    pair.write(out)?;
    eprintln!(
        "wrote {0}/private-key.pem, {0}/public-key.pem, {0}/jwks.json (kid {kid})",
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn token(cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TokenCommand::Mint {
            key,
            kid,
            container_id,
            user_id,
            allow,
            ttl,
            issuer,
            audience,
            config,
            limits,
            organization_uuid,
        } => {
            let presets = match config {
                Some(p) => sluice::presets::Presets::new(&Config::load(&p)?.presets)?,
                None => sluice::presets::Presets::default(),
            };
            let signer = Signer::load(&key, &kid, &issuer, &audience)?
                .with_presets(std::sync::Arc::new(presets));
            let minted = signer.mint(&MintRequest {
                enforce: Default::default(),
                limits: limits.map(|l| *l).unwrap_or_default(),
                organization_uuid,
                credentials: Vec::new(),
                container_id,
                user_id,
                allowed_hosts: allow,
                ttl,
            })?;
            println!("{}", minted.token);
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::Verify {
            jwks,
            issuer,
            audience,
            leeway,
            token,
        } => {
            let verifier = Verifier::new(Jwks::load(&jwks)?, &issuer, &audience, leeway);
            match verifier.verify_uncached(token.trim()) {
                Ok(grant) => {
                    println!("{}", serde_json::to_string_pretty(&grant.claims)?);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("sluice: token rejected ({}): {e}", e.deny());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}

fn check(path: &Path) -> anyhow::Result<ExitCode> {
    match Config::load(path) {
        Ok(_) => {
            println!("{}: ok", path.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{}", sluice::error_chain(&e));
            Ok(ExitCode::FAILURE)
        }
    }
}

fn rules(args: RulesArgs) -> anyhow::Result<ExitCode> {
    use sluice::rules::{Binding, RulesError, Spec, Target};
    let run = || -> Result<ExitCode, RulesError> {
        let target = Target::new(args.iface.as_deref(), args.subnet.as_deref())?;
        let binds = args
            .binds
            .iter()
            .map(|b| b.parse::<Binding>())
            .collect::<Result<Vec<_>, _>>()?;
        match args.action {
            RulesAction::Apply => {
                let mut spec = Spec::new(target, args.port);
                spec.proxy_port = args.proxy_port;
                spec.dns_port = args.dns_port;
                spec.source = args.source;
                spec.binds = binds;
                spec.dynamic = args.bind_dynamic;
                spec.l2_trusted = args.l2_trusted;
                sluice::rules::apply(&spec)?;
            }
            RulesAction::Remove => sluice::rules::remove(&target)?,
            RulesAction::Status => {
                let (applied, text) = sluice::rules::status(&target)?;
                println!("{}", if applied { "applied" } else { "not applied" });
                print!("{text}");
                return Ok(if applied {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                });
            }
            RulesAction::Bind | RulesAction::Unbind => {
                let [b] = binds[..] else {
                    return Err(RulesError::Invalid(
                        "bind and unbind take exactly one --bind IP=MAC".into(),
                    ));
                };
                sluice::rules::bind(&target, &b, matches!(args.action, RulesAction::Bind))?;
            }
        }
        Ok(ExitCode::SUCCESS)
    };
    match run() {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!("sluice: {}", sluice::error_chain(&e));
            Ok(ExitCode::from(if e.is_usage() { 2 } else { 1 }))
        }
    }
}

fn explain(
    config_path: Option<&Path>,
    token: &str,
    host: &str,
    port: Option<u16>,
    request: Option<(&str, &str)>,
) -> anyhow::Result<ExitCode> {
    use sluice::decision::{Caller, Credentials, Decision, Target};
    let config = match config_path {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let presets = std::sync::Arc::new(sluice::presets::Presets::new(&config.presets)?);
    let jwks = Jwks::load(&config.jwks_path())?;
    let verifier = Verifier::new(
        jwks,
        &config.auth.issuer,
        &config.auth.audience,
        config.auth.leeway_s,
    )
    .with_max_life(config.auth.max_ttl_s)
    .with_presets(presets);
    let (host, host_port) = sluice::host::split_authority(host.trim())
        .map_err(|e| anyhow::anyhow!("--host {host:?}: {e}"))?;
    let port = port.or(host_port).unwrap_or(443);
    if port == 0 {
        bail!("--port must be 1-65535");
    }
    let connections = std::sync::Arc::default();
    let tenants = sluice::live::Tenants::default();
    let decision = Decision {
        verifier: &verifier,
        connections: &connections,
        tenants: &tenants,
        gateway: &config.gateway,
    };
    let explained = decision.explain(
        &Caller::Credentials(Credentials::Bearer(token.trim().to_owned())),
        &Target { host, port },
        request,
    );
    println!("{}", explained.to_json());
    Ok(if explained.decision.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn policy_suggest(
    config_path: Option<&Path>,
    container_id: &str,
    include_denied: bool,
) -> anyhow::Result<ExitCode> {
    let config = match config_path {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let events = sluice::events::Events::default();
    let file = config.state_dir.join(sluice::events::DESTINATIONS_FILE);
    events.load(&file, |c| c == container_id);
    let destinations = events.destinations(container_id);
    if destinations.is_empty() {
        eprintln!(
            "sluice: nothing recorded for {container_id:?} in {} (the gateway saves what sandboxes reach every 5 s)",
            file.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    let suggestion =
        sluice::suggest::suggest(&destinations, &config.gateway.allowed_ports, include_denied);
    println!("{}", serde_json::to_string_pretty(&suggestion)?);
    Ok(ExitCode::SUCCESS)
}
