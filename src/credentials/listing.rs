//! What `regcache credentials list` and `GET /admin/credentials` show: per configured upstream,
//! each credential that applies to it (the config file's own first, as it takes precedence),
//! with its source, user name, kind and load time. The value stays a `Secret`: a caller must
//! expose it on purpose (`--show-sensitive-info`).

use std::time::SystemTime;

use super::{Credentials, Secret};
use crate::config::{Config, UpstreamConfig};
use crate::credentials::key::canonical_host;

/// The names a credential key may use for `upstream`: its configured name and its URL's
/// `host[:port]`.
pub fn upstream_hosts(upstream: &UpstreamConfig) -> Vec<String> {
    let mut hosts = vec![upstream.name.to_ascii_lowercase()];
    if let Ok(url) = reqwest::Url::parse(&upstream.url)
        && let Some(host) = url.host_str()
    {
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => canonical_host(host).to_owned(),
        };
        if !hosts.contains(&authority) {
            hosts.push(authority);
        }
    }
    hosts
}

/// One row of the listing.
#[derive(Debug, Clone)]
pub struct Listed {
    /// The configured upstream it applies to; `None` when it applies to none of them.
    pub upstream: Option<String>,
    /// The registry key as understood (`ghcr.io/org`), or the upstream name for config ones.
    pub key: String,
    /// `config` or the file it came from.
    pub source: String,
    pub username: Option<String>,
    pub kind: &'static str,
    /// When it was loaded; `None` for the config file's own (loaded at start).
    pub loaded_at: Option<SystemTime>,
    pub secret: Secret,
}

/// Every credential, grouped by the upstream it applies to, then those applying to none.
pub fn list(config: &Config, set: &Credentials) -> Vec<Listed> {
    let loaded = set.all();
    let mut rows = Vec::new();
    let mut used = vec![false; loaded.len()];
    for (i, up) in config.upstreams.iter().enumerate() {
        if let (Some(user), Some(password)) = (&up.username, &up.password) {
            rows.push(Listed {
                upstream: Some(up.name.clone()),
                key: up.name.clone(),
                source: format!("config (upstreams[{i}])"),
                username: Some(user.clone()),
                kind: "basic",
                loaded_at: None,
                secret: password.clone(),
            });
        }
        let hosts = upstream_hosts(up);
        for (j, l) in loaded.iter().enumerate() {
            if hosts.iter().any(|h| l.key.matches_host(h)) {
                used[j] = true;
                rows.push(Listed {
                    upstream: Some(up.name.clone()),
                    key: l.key.to_string(),
                    source: l.source.clone(),
                    username: l.credential.username().map(str::to_owned),
                    kind: l.credential.kind(),
                    loaded_at: Some(l.loaded_at),
                    secret: l.credential.secret().clone(),
                });
            }
        }
    }
    for (j, l) in loaded.iter().enumerate() {
        if !used[j] {
            rows.push(Listed {
                upstream: None,
                key: l.key.to_string(),
                source: l.source.clone(),
                username: l.credential.username().map(str::to_owned),
                kind: l.credential.kind(),
                loaded_at: Some(l.loaded_at),
                secret: l.credential.secret().clone(),
            });
        }
    }
    rows
}

impl Listed {
    /// The row as JSON; the value is included only when `show_sensitive`.
    pub fn to_json(&self, show_sensitive: bool) -> serde_json::Value {
        serde_json::json!({
            "upstream": self.upstream,
            "key": self.key,
            "source": self.source,
            "username": self.username,
            "kind": self.kind,
            "loaded_at": self.loaded_at.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            "secret": if show_sensitive { self.secret.expose().to_owned() } else { self.secret.to_string() },
        })
    }
}

/// Reads the configured sources once and lists them, with the sources that failed: what
/// `regcache credentials list` prints, without a running mirror.
pub fn load_and_list(config: &Config) -> (Vec<Listed>, Vec<(String, String)>) {
    let set = Credentials::new(
        &config.credentials,
        std::sync::Arc::new(crate::metrics::Metrics::new()),
    );
    set.reload();
    (list(config, &set), set.errors())
}

/// As [`load_and_list`], plus the Secrets read through the Kubernetes API when that source is
/// on (one list, waited for up to ten seconds), so the command shows what the server would use.
pub async fn load_and_list_all(config: &Config) -> (Vec<Listed>, Vec<(String, String)>) {
    let set = std::sync::Arc::new(Credentials::new(
        &config.credentials,
        std::sync::Arc::new(crate::metrics::Metrics::new()),
    ));
    set.reload();
    let mut api_errors = Vec::new();
    if config.credentials.kubernetes.enabled {
        match super::kubernetes::client(&config.credentials.kubernetes).await {
            Ok((client, namespace)) => {
                let mut watches = super::kubernetes::watch(
                    &set,
                    client,
                    &namespace,
                    &config.credentials.kubernetes,
                );
                if !watches
                    .wait_listed(std::time::Duration::from_secs(10))
                    .await
                {
                    api_errors.push((
                        format!("kubernetes:{namespace}"),
                        "the Secrets were not listed within 10s".to_owned(),
                    ));
                }
                watches.abort();
            }
            Err(e) => api_errors.push(("kubernetes".to_owned(), e.to_string())),
        }
    }
    let mut errors = set.errors();
    errors.extend(api_errors);
    (list(config, &set), errors)
}

/// The rows as an aligned text table; values masked unless `show_sensitive`.
pub fn render_table(rows: &[Listed], show_sensitive: bool) -> String {
    let header = [
        "UPSTREAM", "KEY", "SOURCE", "USER", "KIND", "LOADED", "SECRET",
    ];
    let mut table: Vec<[String; 7]> = vec![header.map(str::to_owned)];
    for row in rows {
        table.push([
            row.upstream.clone().unwrap_or_else(|| "(none)".into()),
            row.key.clone(),
            row.source.clone(),
            row.username.clone().unwrap_or_else(|| "-".into()),
            row.kind.to_owned(),
            row.loaded_at.map_or_else(
                || "at start".to_owned(),
                |t| humantime::format_rfc3339_seconds(t).to_string(),
            ),
            if show_sensitive {
                row.secret.expose().to_owned()
            } else {
                row.secret.to_string()
            },
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|c| {
            table
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in &table {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn rows_per_upstream_config_first_values_masked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("config.json");
        std::fs::write(
            &file,
            r#"{"auths":{"https://index.docker.io/v1/":{"username":"hub","password":"hub-hunter2"},
                "ghcr.io/org":{"registrytoken":"tok-hunter2"},
                "quay.io":{"username":"q","password":"q-hunter2"}}}"#,
        )
        .expect("write");
        let config = Config::from_yaml(&format!(
            "upstreams:\n\
             - {{name: docker.io, url: 'https://registry-1.docker.io'}}\n\
             - {{name: ghcr.io, url: 'https://ghcr.io', username: bot, password: cfg-hunter2}}\n\
             credentials: {{files: [{:?}]}}\n",
            file.display().to_string()
        ))
        .expect("valid");
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let set = Credentials::new(&config.credentials, metrics);
        set.reload();
        let rows = list(&config, &set);
        let summary: Vec<(Option<&str>, &str, &str)> = rows
            .iter()
            .map(|r| (r.upstream.as_deref(), r.key.as_str(), r.kind))
            .collect();
        assert_eq!(
            summary,
            vec![
                (Some("docker.io"), "docker.io", "basic"),
                (Some("ghcr.io"), "ghcr.io", "basic"),
                (Some("ghcr.io"), "ghcr.io/org", "registrytoken"),
                (None, "quay.io", "basic"),
            ]
        );
        assert!(rows[1].source.starts_with("config"));
        let masked = render_table(&rows, false);
        assert!(!masked.contains("hunter2"), "{masked}");
        assert!(
            masked.contains("****") && masked.contains("hub"),
            "{masked}"
        );
        let json = serde_json::Value::Array(rows.iter().map(|r| r.to_json(false)).collect());
        assert!(!json.to_string().contains("hunter2"), "{json}");
        let shown = render_table(&rows, true);
        for secret in ["hub-hunter2", "tok-hunter2", "cfg-hunter2", "q-hunter2"] {
            assert!(shown.contains(secret), "{shown}");
        }
    }
}
