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
    /// Point a node's container runtime at the mirror: write containerd hosts.toml
    /// directories, a k3s registries.yaml or a CRI-O/podman registries.conf drop-in for every
    /// configured upstream.
    NodeConfig(NodeConfigArgs),
}

#[derive(clap::Args)]
struct NodeConfigArgs {
    /// The mirror's config file: its `upstreams` are the registries routed through the mirror.
    #[arg(long, short, env = "REGCACHE_CONFIG")]
    config: Option<PathBuf>,
    /// The mirror as the node reaches it: http://HOST:PORT or https://HOST:PORT.
    #[arg(long)]
    mirror: String,
    /// Which runtime's files to write.
    #[arg(long, value_enum, default_value = "containerd")]
    runtime: RuntimeArg,
    /// Directory to write into: containerd's config_path (/etc/containerd/certs.d), k3s's
    /// /etc/rancher/k3s, or /etc/containers/registries.conf.d. Without it the files are
    /// printed.
    #[arg(long)]
    out: Option<PathBuf>,
    /// CA bundle, as a path on the node, that signed an https mirror's certificate.
    #[arg(long)]
    mirror_ca_file: Option<PathBuf>,
    /// Username the runtime sends to the mirror (downstream auth, HTTP Basic).
    #[arg(long, requires = "password_file")]
    username: Option<String>,
    /// File holding that user's password (a mounted Secret key).
    #[arg(long, requires = "username")]
    password_file: Option<PathBuf>,
    /// Also create the mirror's cache directory (a hostPath seen at this path), owned by
    /// --cache-owner, so a non-root mirror can write to it.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// UID:GID owning --cache-dir.
    #[arg(long, default_value = "65532:65532")]
    cache_owner: String,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum RuntimeArg {
    Containerd,
    K3s,
    Crio,
}

fn node_config(args: NodeConfigArgs) -> Result<(), String> {
    use regcache::nodeconfig::{self, MirrorAddr, MirrorCredentials, Options, Runtime};
    let config =
        regcache::config::Config::load(args.config.as_deref()).map_err(|e| e.to_string())?;
    let credentials = match (args.username, args.password_file) {
        (Some(username), Some(file)) => {
            let password = std::fs::read_to_string(&file)
                .map_err(|e| format!("cannot read --password-file {}: {e}", file.display()))?;
            let password = password.trim_end_matches(['\r', '\n']);
            Some(MirrorCredentials {
                username,
                password: regcache::config::Secret::new(password),
            })
        }
        _ => None,
    };
    let options = Options {
        mirror: MirrorAddr::parse(&args.mirror).map_err(|e| e.to_string())?,
        mirror_ca_file: args.mirror_ca_file,
        credentials,
    };
    let runtime = match args.runtime {
        RuntimeArg::Containerd => Runtime::Containerd,
        RuntimeArg::K3s => Runtime::K3s,
        RuntimeArg::Crio => Runtime::Crio,
    };
    let files = nodeconfig::render(
        runtime,
        &config.upstreams,
        &config.default_upstream,
        &options,
    )
    .map_err(|e| e.to_string())?;
    if let Some(dir) = &args.cache_dir {
        let (uid, gid) = args
            .cache_owner
            .split_once(':')
            .and_then(|(uid, gid)| Some((uid.parse().ok()?, gid.parse().ok()?)))
            .ok_or_else(|| format!("--cache-owner {:?}: expected UID:GID", args.cache_owner))?;
        nodeconfig::prepare_cache_dir(dir, uid, gid).map_err(|e| e.to_string())?;
    }
    match args.out {
        Some(out) => {
            nodeconfig::write(&out, &files).map_err(|e| e.to_string())?;
            for file in &files {
                println!("wrote {}", out.join(&file.path).display());
            }
        }
        None => {
            for file in &files {
                println!("# --- {}\n{}", file.path.display(), file.contents);
            }
        }
    }
    Ok(())
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
        Command::NodeConfig(args) => match node_config(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("regcache: {e}");
                ExitCode::from(2)
            }
        },
    }
}
