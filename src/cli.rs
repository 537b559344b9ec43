//! The command line (contract §1). Exit codes: 0 ok, 2 bad usage or invalid config, 1 runtime
//! failure; errors go to stderr, one line each.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::auth::mint::{TokenRequest, mint_hs256};
use crate::config::{Algorithm, Config};
use crate::server::{self, RunOptions};

pub const EXIT_OK: i32 = 0;
pub const EXIT_RUNTIME: i32 = 1;
pub const EXIT_USAGE: i32 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "vncgate",
    version,
    about = "Edge proxy for VNC farms: noVNC over wss:// with a JWT"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve with a config file.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Take the listening sockets over from a running instance (graceful upgrade).
        #[arg(long)]
        upgrade: bool,
        #[arg(long)]
        daemon: bool,
    },
    /// Validate a config file: exit 0, or 2 with one line per problem.
    ///
    /// Without --lint the check is made for this machine: the files the config names are read
    /// (public keys parsed, TLS certificates and keys loaded, as `run` would) and the variables
    /// its `*_env` keys name must be set.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
        /// Check the file alone, as a pre-deploy lint in CI: schema, every key, ranges and
        /// cross-key rules, without reading the files it names or requiring the variables its
        /// `*_env` keys name (those are checked to be variable names only).
        #[arg(long)]
        lint: bool,
    },
    /// Print an HS256 token signed with the configured secret.
    Token(TokenArgs),
    /// Zero-setup local run: in-memory store, fresh secret, plain listener, one backend.
    Demo(crate::demo::DemoArgs),
    /// Session recordings (contract §12).
    #[command(subcommand)]
    Recording(RecordingCommand),
}

#[derive(Subcommand, Debug)]
pub enum RecordingCommand {
    /// Check that FILE is a well-formed FBS recording with its handshake: exit 0 and print
    /// duration, bytes, blocks, the desktop's size and name and whether it is incomplete, or
    /// exit 1 with the reason.
    Verify { file: PathBuf },
    /// Write the framebuffer at SECONDS into FILE (the last frame when the recording is
    /// shorter) to OUT as a PNG: exit 0 and print the moment shown and the size, or exit 1
    /// with the reason.
    Export {
        file: PathBuf,
        /// Seconds since the recording's start (fractions allowed).
        #[arg(long, value_parser = parse_seconds)]
        at: u64,
        /// The PNG to write.
        #[arg(long)]
        png: PathBuf,
    },
}

/// `--at`: non-negative seconds, as milliseconds.
fn parse_seconds(s: &str) -> Result<u64, String> {
    match s.parse::<f64>() {
        Ok(secs) if (0.0..1e12).contains(&secs) => Ok((secs * 1000.0).round() as u64),
        _ => Err(format!("{s:?} is not a number of seconds >= 0")),
    }
}

#[derive(clap::Args, Debug)]
pub struct TokenArgs {
    #[arg(long)]
    config: PathBuf,
    #[arg(long)]
    sub: String,
    #[arg(long)]
    sid: Option<String>,
    #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
    ttl: Duration,
    #[arg(long)]
    pool: Option<String>,
    #[arg(long)]
    backend: Option<String>,
    #[arg(long)]
    view_only: bool,
    #[arg(long)]
    jti: Option<String>,
    /// Join a session another user owns: `view` (always view-only) or `control`.
    #[arg(long, value_enum)]
    share: Option<crate::auth::claims::Share>,
    /// Narrow the pool's clipboard policy.
    #[arg(long, value_enum)]
    clipboard: Option<crate::auth::claims::ClipboardClaim>,
    /// Ask for the session to be recorded (`recording.when: claim`).
    #[arg(long)]
    record: bool,
}

impl TokenArgs {
    /// The claims to sign; issuer and audience come from the config, so the token passes the
    /// gateway's own checks.
    fn request(self, config: &Config) -> TokenRequest {
        TokenRequest {
            iss: config.auth.issuer.clone(),
            aud: config.auth.audience.clone(),
            sub: self.sub,
            sid: self.sid,
            ttl: self.ttl,
            pool: self.pool,
            backend: self.backend,
            view_only: self.view_only,
            jti: self.jti,
            share: self.share,
            clipboard: self.clipboard,
            record: self.record,
        }
    }
}

pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Help and version go to stdout in full; a usage error is one line on stderr
        // (contract §1), the rest of clap's rendering (usage, hints) dropped.
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprintln!(
                "error: a command is required: run, check-config, token, demo, recording (see --help)"
            );
            return EXIT_USAGE;
        }
        Err(e) if e.use_stderr() => {
            let rendered = e.render().to_string();
            let first_paragraph: Vec<&str> = rendered
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            eprintln!("{}", first_paragraph.join(" "));
            return EXIT_USAGE;
        }
        Err(e) => {
            let _ = e.print();
            return EXIT_OK;
        }
    };
    match cli.command {
        Command::Run {
            config: path,
            upgrade,
            daemon,
        } => {
            let config = match load(&path) {
                Ok(c) => c,
                Err(code) => return code,
            };
            crate::telemetry::init(config.logging.format, &config.logging.level);
            // Absolute: `--daemon` moves the process to `/`, and SIGHUP re-reads this path.
            let path = std::path::absolute(&path).unwrap_or(path);
            let options = RunOptions {
                upgrade,
                daemon,
                config_path: Some(path),
            };
            match server::run(config, options) {
                Ok(()) => EXIT_OK,
                Err(e) => {
                    eprintln!("{e}");
                    EXIT_RUNTIME
                }
            }
        }
        Command::CheckConfig { config, lint: true } => match Config::lint(&config) {
            Ok(()) => EXIT_OK,
            Err(errors) => {
                eprintln!("{errors}");
                EXIT_USAGE
            }
        },
        Command::CheckConfig {
            config,
            lint: false,
        } => match load(&config) {
            Ok(c) => {
                // What `run` would load beyond the file itself: keys and certificates, so a
                // config that passes here does not fail at start.
                let mut problems: Vec<String> = Vec::new();
                if let Err(e) = crate::auth::Verifier::new(&c.auth) {
                    problems.push(e.to_string());
                }
                for (index, listener) in c.listeners.iter().enumerate() {
                    if let Some(files) = &listener.tls
                        && let Err(e) = crate::gateway::tls::load(index, &files.cert, &files.key)
                    {
                        problems.push(e.to_string());
                    }
                }
                for p in &problems {
                    eprintln!("{p}");
                }
                if problems.is_empty() {
                    EXIT_OK
                } else {
                    EXIT_USAGE
                }
            }
            Err(code) => code,
        },
        Command::Token(args) => {
            let config = match load(&args.config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let request = args.request(&config);
            match token(&config, &request) {
                Ok(t) => {
                    println!("{t}");
                    EXIT_OK
                }
                Err(msg) => {
                    eprintln!("{msg}");
                    EXIT_USAGE
                }
            }
        }
        Command::Demo(args) => crate::demo::run(args),
        Command::Recording(RecordingCommand::Export { file, at, png }) => {
            match crate::recording::export::export_png(&file, at, &png) {
                Ok(e) => {
                    println!(
                        "shown: {:.3} s{}",
                        f64::from(e.shown_ms) / 1000.0,
                        if e.past_end {
                            " (the recording's end)"
                        } else {
                            ""
                        }
                    );
                    println!("size: {}x{}", e.width, e.height);
                    println!("wrote: {}", png.display());
                    EXIT_OK
                }
                Err(e) => {
                    eprintln!("{e}");
                    EXIT_RUNTIME
                }
            }
        }
        Command::Recording(RecordingCommand::Verify { file }) => {
            match crate::recording::verify::verify_file(&file) {
                Ok(report) => {
                    println!("{report}");
                    EXIT_OK
                }
                Err(e) => {
                    eprintln!("{e}");
                    EXIT_RUNTIME
                }
            }
        }
    }
}

/// Load and validate, printing every problem; `Err(exit code)` on failure.
fn load(path: &std::path::Path) -> Result<Config, i32> {
    Config::load(path).map_err(|errors| {
        eprintln!("{errors}");
        EXIT_USAGE
    })
}

/// Mint a token the configured gateway will accept, refusing requests it would refuse anyway.
pub fn token(config: &Config, req: &TokenRequest) -> Result<String, String> {
    if !config.auth.algorithms.contains(&Algorithm::HS256) {
        return Err(
            "auth.algorithms: HS256 is not allowed, so vncgate cannot mint a token for this config"
                .into(),
        );
    }
    let secret = config
        .auth
        .secret
        .as_ref()
        .ok_or("auth.secret_env: no secret configured")?;
    let pool_name = req.pool.as_deref().unwrap_or("default");
    let pool = config
        .pool(pool_name)
        .ok_or_else(|| format!("--pool: no pool named {pool_name:?}"))?;
    if let Some(b) = &req.backend
        && !pool.backends.iter().any(|x| &x.name == b)
    {
        return Err(format!(
            "--backend: pool {pool_name:?} has no backend named {b:?}"
        ));
    }
    if let Some(sid) = &req.sid
        && !crate::auth::authorize::valid_session_id(sid)
    {
        return Err("--sid: must match [A-Za-z0-9._:-]{1,128}".into());
    }
    mint_hs256(secret.expose().as_bytes(), req).map_err(|e| format!("signing failed: {e}"))
}
