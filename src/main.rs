//! The `regcache` command: parses arguments, loads the config, starts logging, and hands over
//! to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A pull-through caching mirror for OCI and Docker registries.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the mirror.
    Serve {
        /// YAML config file; without it the embedded defaults (config/regcache.yaml) apply:
        /// listen on 127.0.0.1:5000, cache in ./regcache-data, Docker Hub upstream.
        #[arg(long, short, env = "REGCACHE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Manage pull tokens for `access.tokens_file`.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Check a config file and print the effective settings (credentials masked).
    CheckConfig {
        #[arg(long, short, env = "REGCACHE_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a pull token: prints the token (shown only this once) and the line to add to the
    /// tokens file.
    Create {
        /// The token's name, used in access rules as `token:NAME` and in audit logs.
        #[arg(long)]
        name: String,
        /// Lifetime, e.g. `90d`, `12h`, or `never`.
        #[arg(long, default_value = "90d")]
        expires: String,
        /// `upstream/repository` globs the token may pull at most (repeatable), e.g.
        /// `docker.io/library/*`, `ghcr.io/acme/**`, `**`.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
    },
}

fn token_create(name: &str, expires: &str, scopes: &[String]) -> ExitCode {
    let expires = if expires == "never" {
        None
    } else {
        match humantime::parse_duration(expires) {
            Ok(d) => Some(std::time::SystemTime::now() + d),
            Err(e) => {
                eprintln!("regcache: --expires `{expires}`: {e} (e.g. 90d, 12h, never)");
                return ExitCode::from(2);
            }
        }
    };
    match regcache::access::tokens::create(name, expires, scopes) {
        Ok(created) => {
            println!("token: {}", created.token);
            println!("tokens file line: {}", created.line);
            eprintln!(
                "The token is shown only now. Add the line to access.tokens_file; the policy must also allow token:{name}."
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("regcache: {e}");
            ExitCode::from(2)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            let config = match regcache::config::Config::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("regcache: {e}");
                    return ExitCode::from(2);
                }
            };
            regcache::telemetry::init(&config.log);
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("regcache: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(regcache::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "regcache stopped");
                    eprintln!("regcache: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Token {
            command:
                TokenCommand::Create {
                    name,
                    expires,
                    scopes,
                },
        } => token_create(&name, &expires, &scopes),
        Command::CheckConfig { config } => {
            match regcache::config::Config::load(config.as_deref()) {
                Ok(c) => {
                    println!("{c:#?}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("regcache: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}
