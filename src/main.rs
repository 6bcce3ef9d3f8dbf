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
    /// Inspect and maintain the disk cache.
    Cache {
        #[arg(long, short, env = "REGCACHE_CONFIG", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        command: CacheCommand,
    },
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Size, objects and usage by upstream; the hit ratio when the mirror is running.
    Stats {
        /// The running mirror's metrics; default: http://<listen>/metrics from the config.
        #[arg(long)]
        metrics_url: Option<String>,
        /// Count from the files on disk instead of trusting the access index.
        #[arg(long)]
        scan: bool,
    },
    /// Rehash every cached object; corrupt ones are quarantined and never served again.
    /// Exits with 1 when any was found.
    Verify,
    /// Evict least recently used content now (pinned content stays).
    Gc {
        /// Size to evict down to: bytes (10GiB) or a share of the filesystem (50%). Without
        /// it, the configured cache.limits are applied once. With the mirror running, the mirror
        /// does it and this prints its report.
        #[arg(long)]
        target: Option<String>,
    },
}

fn load(config: Option<&std::path::Path>) -> Result<regcache::config::Config, ExitCode> {
    regcache::config::Config::load(config).map_err(|e| {
        eprintln!("regcache: {e}");
        ExitCode::from(2)
    })
}

fn cache_command(config: Option<PathBuf>, command: CacheCommand) -> ExitCode {
    let config = match load(config.as_deref()) {
        Ok(c) => c,
        Err(code) => return code,
    };
    regcache::telemetry::init(&regcache::config::LogConfig {
        level: "warn".into(),
        ..config.log.clone()
    });
    let failed = |e: &dyn std::fmt::Display| {
        eprintln!("regcache: {e}");
        ExitCode::FAILURE
    };
    match command {
        CacheCommand::Stats { metrics_url, scan } => {
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => return failed(&e),
            };
            match runtime.block_on(regcache::maintenance::stats(
                &config,
                metrics_url.as_deref(),
                scan,
            )) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => failed(&e),
            }
        }
        CacheCommand::Verify => {
            match regcache::maintenance::verify(&config, |line| eprintln!("{line}")) {
                Ok(outcome) => {
                    print!("{}", outcome.report);
                    if outcome.corrupt == 0 {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => failed(&e),
            }
        }
        CacheCommand::Gc { target } => {
            match regcache::maintenance::gc(&config, target.as_deref()) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => failed(&e),
            }
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
        Command::Cache { config, command } => cache_command(config, command),
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
