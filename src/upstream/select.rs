//! Choosing the upstream for a request: the `ns` query parameter containerd sends, else a
//! registry host as the first path component, else the default. Only configured upstreams can
//! be chosen, so a client cannot make the mirror fetch from a host of its choosing.

use std::collections::HashMap;
use std::sync::Arc;

use super::client::{self, Upstream};
use crate::config::Config;
use crate::credentials::Credentials;
use crate::metrics::Metrics;
use crate::oci::{ImageName, RegistryHost, RepoName};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectError {
    #[error("registry {0} is not served by this mirror")]
    NotConfigured(String),
    #[error("the ns parameter is not a registry host")]
    BadNamespace,
    #[error("with ns set, the name must be a repository name")]
    NameInvalid,
}

pub struct Upstreams {
    by_name: HashMap<RegistryHost, Arc<Upstream>>,
    default: Arc<Upstream>,
}

/// Docker Hub is reached under several names; clients use them interchangeably.
fn canonical(host: RegistryHost) -> RegistryHost {
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".parse().expect("docker.io is a valid host")
        }
        _ => host,
    }
}

impl Upstreams {
    pub fn new(
        config: &Config,
        credentials: Arc<Credentials>,
        metrics: Arc<Metrics>,
    ) -> Result<Upstreams, client::Error> {
        let mut by_name = HashMap::new();
        for up in &config.upstreams {
            let mut upstream = Upstream::new(
                up,
                &config.upstream_client,
                credentials.clone(),
                metrics.clone(),
            )?;
            if config.is_offline(up) {
                upstream.set_offline();
            }
            let upstream = Arc::new(upstream);
            by_name.insert(canonical(upstream.name().clone()), upstream);
        }
        let default_name: RegistryHost = config
            .default_upstream
            .parse()
            .map_err(|_| client::Error::Config("default_upstream is not a registry host".into()))?;
        let default = by_name
            .get(&canonical(default_name))
            .cloned()
            .ok_or_else(|| client::Error::Config("default_upstream is not configured".into()))?;
        Ok(Upstreams { by_name, default })
    }

    pub fn all(&self) -> impl Iterator<Item = &Arc<Upstream>> {
        self.by_name.values()
    }

    fn get(&self, host: RegistryHost) -> Result<Arc<Upstream>, SelectError> {
        let host = canonical(host);
        self.by_name
            .get(&host)
            .cloned()
            .ok_or_else(|| SelectError::NotConfigured(host.to_string()))
    }

    /// The upstream and the repository name to ask it for.
    pub fn select(
        &self,
        ns: Option<&str>,
        name: &ImageName,
    ) -> Result<(Arc<Upstream>, RepoName), SelectError> {
        let (upstream, repo) = match ns {
            Some(ns) => {
                let host = ns
                    .parse::<RegistryHost>()
                    .map_err(|_| SelectError::BadNamespace)?;
                let repo = name.whole.clone().ok_or(SelectError::NameInvalid)?;
                (self.get(host)?, repo)
            }
            None => match &name.host {
                Some(host) => (self.get(host.clone())?, name.repo.clone()),
                None => (self.default.clone(), name.repo.clone()),
            },
        };
        let repo = if upstream.name().as_str() == "docker.io" {
            repo.with_library_prefix()
        } else {
            repo
        };
        Ok((upstream, repo))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstreams() -> Upstreams {
        let config = Config::from_yaml(
            r#"
upstreams:
  - {name: docker.io, url: "https://registry-1.docker.io"}
  - {name: ghcr.io, url: "https://ghcr.io"}
  - {name: "registry.example.com:5000", url: "https://registry.example.com:5000"}
"#,
        )
        .expect("valid config");
        let metrics = Arc::new(Metrics::new());
        Upstreams::new(
            &config,
            Arc::new(Credentials::empty(metrics.clone())),
            metrics,
        )
        .expect("clients build")
    }

    fn pick(u: &Upstreams, ns: Option<&str>, name: &str) -> Result<(String, String), SelectError> {
        let name: ImageName = name.parse().expect("valid name");
        u.select(ns, &name)
            .map(|(up, repo)| (up.name().to_string(), repo.to_string()))
    }

    #[test]
    fn ns_wins_then_prefix_then_default() {
        let u = upstreams();
        let pair = |a: &str, b: &str| Ok((a.to_string(), b.to_string()));
        assert_eq!(
            pick(&u, Some("ghcr.io"), "org/app"),
            pair("ghcr.io", "org/app")
        );
        assert_eq!(
            pick(&u, Some("docker.io"), "alpine"),
            pair("docker.io", "library/alpine")
        );
        assert_eq!(
            pick(&u, Some("index.docker.io"), "alpine"),
            pair("docker.io", "library/alpine")
        );
        assert_eq!(
            pick(&u, None, "ghcr.io/org/app"),
            pair("ghcr.io", "org/app")
        );
        assert_eq!(
            pick(&u, None, "registry.example.com:5000/team/app"),
            pair("registry.example.com:5000", "team/app")
        );
        assert_eq!(
            pick(&u, None, "alpine"),
            pair("docker.io", "library/alpine")
        );
        assert_eq!(
            pick(&u, None, "docker.io/alpine"),
            pair("docker.io", "library/alpine")
        );
        assert_eq!(
            pick(&u, Some("ghcr.io"), "my.org/app"),
            pair("ghcr.io", "my.org/app")
        );
    }

    #[test]
    fn unconfigured_hosts_are_refused() {
        let u = upstreams();
        assert_eq!(
            pick(&u, Some("quay.io"), "org/app"),
            Err(SelectError::NotConfigured("quay.io".into()))
        );
        assert_eq!(
            pick(&u, None, "evil.example:80/org/app"),
            Err(SelectError::NotConfigured("evil.example:80".into()))
        );
        assert_eq!(
            pick(&u, Some("not a host"), "org/app"),
            Err(SelectError::BadNamespace)
        );
        assert_eq!(
            pick(&u, Some("ghcr.io"), "localhost:5000/app"),
            Err(SelectError::NameInvalid)
        );
    }
}
