//! The `regcache` command: parses arguments, loads the config, starts logging, and hands over
//! to the library.

use std::future::Future;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use regcache::airgap;
use regcache::config::Config;

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
        /// Serve only what is cached and never contact an upstream (the config's `offline`).
        #[arg(long)]
        offline: bool,
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
    /// Pull whole images into the cache (for an air-gapped site, or to warm a mirror).
    ///
    /// Each image's manifests, every child of an index (or the chosen --platforms), its config
    /// and layers are downloaded from the configured upstreams and verified, as a pull through
    /// the mirror would; what is already cached is skipped. Tags are recorded, so they resolve
    /// when the upstream is offline.
    Seed {
        /// Images such as docker.io/library/nginx:1.27 or ghcr.io/org/app@sha256:...
        images: Vec<String>,
        /// A file of image references, one a line (# comments allowed).
        #[arg(long, short)]
        file: Option<PathBuf>,
        /// Keep only this platform of an index (os/arch[/variant]); repeatable. Default: all.
        #[arg(long = "platform")]
        platforms: Vec<String>,
        /// Pin what is seeded, so cache eviction never removes it.
        #[arg(long)]
        pin: bool,
        /// Downloads at once.
        #[arg(long, short, default_value_t = 4)]
        jobs: usize,
        #[arg(long, short, env = "REGCACHE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Write cached images as an OCI image layout, to carry across an air gap.
    ///
    /// The bundle is a directory, or a tar when --output ends in .tar; its index.json names
    /// each image by its full reference, so `skopeo copy oci:BUNDLE:REF ...` reads it as well
    /// as `regcache import`. Reads the cache only; a missing object is an error naming it.
    Export {
        /// Images such as docker.io/library/nginx:1.27 or ghcr.io/org/app@sha256:...
        images: Vec<String>,
        /// A file of image references, one a line (# comments allowed).
        #[arg(long, short)]
        file: Option<PathBuf>,
        /// The bundle to create: a directory, or a tar when the name ends in .tar.
        #[arg(long, short)]
        output: PathBuf,
        /// Export only this platform of an index (as seeded with --platform); repeatable.
        #[arg(long = "platform")]
        platforms: Vec<String>,
        #[arg(long, short, env = "REGCACHE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Load a bundle made by `regcache export` (or any OCI layout naming full references).
    ///
    /// Every blob's digest and size is checked before anything is stored: a corrupt or
    /// truncated bundle is refused, naming the offending digest, and nothing is imported.
    Import {
        /// The bundle: an OCI image layout directory or a tar of one.
        bundle: PathBuf,
        /// Pin what is imported, so cache eviction never removes it.
        #[arg(long)]
        pin: bool,
        #[arg(long, short, env = "REGCACHE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Point a node's container runtime at the mirror: write containerd hosts.toml
    /// directories, a k3s registries.yaml or a CRI-O/podman registries.conf drop-in for every
    /// configured upstream.
    NodeConfig(NodeConfigArgs),
    /// Upstream credentials (config file and mounted Secrets).
    Credentials {
        #[command(subcommand)]
        command: CredentialsCommand,
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
    /// Also copy this CA bundle (e.g. a mounted Secret's ca.crt) into --out as
    /// regcache-mirror-ca.crt, so a node gets it without being edited by hand; name that file
    /// as the node sees it with --mirror-ca-file.
    #[arg(long, requires_all = ["mirror_ca_file", "out"])]
    install_mirror_ca: Option<PathBuf>,
    /// Username the runtime sends to the mirror (downstream auth, HTTP Basic).
    #[arg(long, requires = "password_file", conflicts_with = "token_file")]
    username: Option<String>,
    /// File holding that user's password (a mounted Secret key).
    #[arg(long, requires = "username")]
    password_file: Option<PathBuf>,
    /// File holding a pull token (`regcache token create`; a mounted Secret key) the runtime
    /// sends to the mirror: containerd as a static `Authorization: Bearer` header, k3s as the
    /// password of the token flow.
    #[arg(long)]
    token_file: Option<PathBuf>,
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
    let credentials = match (args.username, args.password_file, args.token_file) {
        (Some(username), Some(file), _) => {
            let password = std::fs::read_to_string(&file)
                .map_err(|e| format!("cannot read --password-file {}: {e}", file.display()))?;
            let password = password.trim_end_matches(['\r', '\n']);
            Some(MirrorCredentials::Basic {
                username,
                password: regcache::config::Secret::new(password),
            })
        }
        (_, _, Some(file)) => {
            let token = std::fs::read_to_string(&file)
                .map_err(|e| format!("cannot read --token-file {}: {e}", file.display()))?;
            Some(MirrorCredentials::pull_token(&token).map_err(|e| e.to_string())?)
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
    let mut files = nodeconfig::render(
        runtime,
        &config.upstreams,
        &config.default_upstream,
        &options,
    )
    .map_err(|e| e.to_string())?;
    if let Some(ca) = &args.install_mirror_ca {
        let contents = std::fs::read_to_string(ca)
            .map_err(|e| format!("cannot read --install-mirror-ca {}: {e}", ca.display()))?;
        files.push(nodeconfig::mirror_ca_file(&contents).map_err(|e| e.to_string())?);
    }
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

fn load_config(config: Option<&std::path::Path>) -> Result<regcache::config::Config, ExitCode> {
    regcache::config::Config::load(config).map_err(|e| {
        eprintln!("regcache: {e}");
        ExitCode::from(2)
    })
}

fn cache_command(config: Option<PathBuf>, command: CacheCommand) -> ExitCode {
    let config = match load_config(config.as_deref()) {
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
    // Two malloc arenas instead of one per thread: an idle mirror's memory is otherwise mostly
    // arenas that busy threads left behind. A download's body arrives in buffers of a few
    // hundred KiB that are freed as fast as new ones are taken: with glibc's defaults each
    // one is a fresh mapping or a heap shrunk and grown again, and the kernel zeroes every
    // page anew (a third of a cold pull's system time). Taking them from the heap and keeping
    // up to 4 MiB free on its top ends most of that churn (512 MiB cold: 0.51 -> 0.485 s here;
    // 16 MiB gained 0.46 s but kept 16 MiB more after load, which `malloc_trim` cannot hand
    // back from the second arena's top). The periodic trim returns the rest.
    #[cfg(target_env = "gnu")]
    // SAFETY: called first thing, before any other thread exists; mallopt only sets tunables.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 20);
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, offline } => {
            let Some(config) = load(config.as_deref(), false) else {
                return ExitCode::from(2);
            };
            let config = Config {
                offline: config.offline || offline,
                ..config
            };
            run(regcache::run(config), true)
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
            let listed = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| rt.block_on(regcache::credentials::load_and_list_all(&config)));
            let (rows, errors) = match listed {
                Ok(listed) => listed,
                Err(e) => {
                    eprintln!("regcache: {e}");
                    return ExitCode::FAILURE;
                }
            };
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
        Command::Cache { config, command } => cache_command(config, command),
        Command::Token {
            command:
                TokenCommand::Create {
                    name,
                    expires,
                    scopes,
                },
        } => token_create(&name, &expires, &scopes),
        Command::CheckConfig { config } => match Config::load(config.as_deref()) {
            Ok(c) => {
                println!("{c:#?}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("regcache: {e}");
                ExitCode::from(2)
            }
        },
        Command::Seed {
            images,
            file,
            platforms,
            pin,
            jobs,
            config,
        } => {
            let Some(config) = load(config.as_deref(), true) else {
                return ExitCode::from(2);
            };
            run(
                async move {
                    let (images, platforms) = images_to_carry(images, file, &platforms)?;
                    let options = airgap::SeedOptions {
                        platforms,
                        pin,
                        jobs,
                    };
                    let cache = regcache::open_cache(&config).await?;
                    let report = airgap::seed(&cache, &images, &options, &*progress()).await?;
                    println!("{report}");
                    finish(report.failures)
                },
                false,
            )
        }
        Command::Export {
            images,
            file,
            output,
            platforms,
            config,
        } => {
            let Some(config) = load(config.as_deref(), true) else {
                return ExitCode::from(2);
            };
            run(
                async move {
                    let (images, platforms) = images_to_carry(images, file, &platforms)?;
                    let cache = regcache::open_cache(&config).await?;
                    let options = airgap::ExportOptions { platforms };
                    let report =
                        airgap::export(&cache, &images, &output, &options, &*progress()).await?;
                    println!(
                        "exported {} images ({} objects, {}) to {}",
                        report.images,
                        report.objects,
                        bytesize::ByteSize::b(report.bytes),
                        output.display()
                    );
                    Ok(())
                },
                false,
            )
        }
        Command::Import {
            bundle,
            pin,
            config,
        } => {
            let Some(config) = load(config.as_deref(), true) else {
                return ExitCode::from(2);
            };
            run(
                async move {
                    let cache = regcache::open_cache(&config).await?;
                    let options = airgap::ImportOptions { pin };
                    let report = airgap::import(&cache, &bundle, &options, &*progress()).await?;
                    println!(
                        "imported {} images ({} objects, {} new, {})",
                        report.images.len(),
                        report.objects,
                        report.new_objects,
                        bytesize::ByteSize::b(report.bytes)
                    );
                    Ok(())
                },
                false,
            )
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

/// Loads the config; a command-line workflow logs errors only, so progress stays readable
/// (what failed is reported by the command itself).
/// The images a seed or an export names (arguments and `--file`), and its `--platform`s.
fn images_to_carry(
    mut images: Vec<String>,
    file: Option<PathBuf>,
    platforms: &[String],
) -> Result<(Vec<String>, Vec<airgap::Platform>), regcache::Error> {
    if let Some(file) = file {
        images.extend(airgap::read_image_list(&file)?);
    }
    if images.is_empty() {
        return Err(usage("name at least one image, or --file"));
    }
    let platforms = platforms
        .iter()
        .map(|p| p.parse())
        .collect::<Result<Vec<_>, _>>()?;
    Ok((images, platforms))
}

fn load(path: Option<&Path>, quiet: bool) -> Option<Config> {
    match load_config(path) {
        Ok(c) => {
            let mut log = c.log.clone();
            if quiet {
                log.level = "error".into();
            }
            regcache::telemetry::init(&log);
            Some(c)
        }
        Err(_) => None,
    }
}

/// Runs `work` on a multi-threaded runtime; `log_failure` also logs a failure (the server's
/// log), besides printing it.
fn run(work: impl Future<Output = Result<(), regcache::Error>>, log_failure: bool) -> ExitCode {
    // Blocking threads (file writes, fsync) leave soon after a burst, so an idle mirror holds
    // little beyond its worker threads.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_keep_alive(std::time::Duration::from_secs(2))
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("regcache: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if log_failure {
                tracing::error!(error = %e, "regcache stopped");
            }
            eprintln!("regcache: {}", airgap::describe(&e));
            ExitCode::FAILURE
        }
    }
}

fn usage(reason: &str) -> regcache::Error {
    regcache::Error::Airgap(airgap::Error::Usage(reason.to_owned()))
}

/// Progress bars on a terminal, plain lines otherwise.
fn progress() -> Box<dyn airgap::Progress> {
    if std::io::stderr().is_terminal() {
        Box::new(airgap::Bars::default())
    } else {
        Box::new(airgap::Lines::default())
    }
}

/// Any failed image (each was reported as it failed) fails the command.
fn finish(failures: Vec<String>) -> Result<(), regcache::Error> {
    if failures.is_empty() {
        Ok(())
    } else {
        Err(regcache::Error::Airgap(airgap::Error::Failed {
            failed: failures.len(),
        }))
    }
}
