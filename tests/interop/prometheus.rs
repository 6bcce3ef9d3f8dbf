//! Debian's Prometheus server, scraping regcache the way the monitoring component
//! (deploy/components/monitoring) has it scraped in a cluster: job `regcache`, with the
//! component's alert rules loaded. Its own port on loopback, its TSDB in the test directory.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::mirror::http_get;
use crate::process::{COMMAND_TIMEOUT, Daemon, command, require_tool, run, write};

pub struct Prometheus {
    pub addr: String,
    _daemon: Daemon,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second as job `regcache`, evaluating the
    /// rule file `rules` (a plain Prometheus rules file) every second.
    pub fn start(dir: &Path, target: &str, rules: &Path) -> Prometheus {
        let prometheus = require_tool("prometheus", "prometheus");
        let addr = format!("127.0.0.1:{}", crate::dead_port());
        let config = dir.join("prometheus.yml");
        write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: regcache\n    static_configs:\n\
                 \x20     - targets: [\"{target}\"]\n",
                rules = rules.display()
            ),
        );
        let mut daemon = Daemon::spawn(
            "prometheus",
            command(&prometheus)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("tsdb").display()
                ))
                .arg(format!("--web.listen-address={addr}")),
            &dir.join("prometheus.log"),
        );
        daemon.wait_for_log("that it is ready", |line| {
            line.contains("Server is ready to receive web requests")
                .then_some(())
        });
        Prometheus {
            addr,
            _daemon: daemon,
        }
    }

    /// Runs an instant query; panics unless Prometheus answers `success`. Returns the result
    /// vector (or scalar) as JSON.
    pub fn query(&self, expr: &str) -> Value {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", expr)
            .finish();
        let (status, body) = http_get(&self.addr, &format!("/api/v1/query?{query}"));
        let answer: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("query {expr:?}: {status} and no JSON ({e}): {body}"));
        assert_eq!(
            answer["status"], "success",
            "Prometheus refused {expr:?}: {answer}"
        );
        answer["data"]["result"].clone()
    }

    /// The state of the loaded rules (`/api/v1/rules`).
    pub fn rules(&self) -> Value {
        let (status, body) = http_get(&self.addr, "/api/v1/rules");
        assert_eq!(status, 200, "GET /api/v1/rules answered {status}: {body}");
        serde_json::from_str(&body).expect("rules are JSON")
    }
}

/// `promtool check rules FILE`, which must pass.
pub fn check_rules(rules: &Path) {
    let promtool = require_tool("promtool", "prometheus");
    run(
        command(&promtool).arg("check").arg("rules").arg(rules),
        COMMAND_TIMEOUT,
    );
}

/// The monitoring component's files.
pub fn component_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/components/monitoring")
        .join(name)
}
