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
    /// Check a config file and print the effective settings (credentials masked).
    CheckConfig {
        #[arg(long, short, env = "REGCACHE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Upstream credentials (config file and mounted Secrets).
    Credentials {
        #[command(subcommand)]
        command: CredentialsCommand,
    },
}

#[derive(Subcommand)]
enum CredentialsCommand {
    /// Per upstream, the credentials that apply to it: source, user name, kind, load time.
    /// Passwords and tokens print as `****`. Exits 1 if a credential source cannot be read.
    List {
        #[arg(long, short, env = "REGCACHE_CONFIG")]
        config: Option<PathBuf>,
        /// Print passwords and tokens in clear. A risk: they end up wherever this output goes
        /// (terminal scrollback, CI logs, support tickets). Use only to debug a credential.
        #[arg(long)]
        show_sensitive_info: bool,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
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
        Command::Credentials {
            command:
                CredentialsCommand::List {
                    config,
                    show_sensitive_info,
                    json,
                },
        } => {
            let config = match regcache::config::Config::load(config.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("regcache: {e}");
                    return ExitCode::from(2);
                }
            };
            let (rows, errors) = regcache::credentials::load_and_list(&config);
            if json {
                for row in &rows {
                    println!("{}", row.to_json(show_sensitive_info));
                }
            } else {
                print!(
                    "{}",
                    regcache::credentials::render_table(&rows, show_sensitive_info)
                );
            }
            for (path, error) in &errors {
                eprintln!("regcache: credential source {path}: {error}");
            }
            if errors.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
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
