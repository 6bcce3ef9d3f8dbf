//! Every metric regcache exports, declared in one place and registered on one `Registry`, named
//! `regcache_<thing>_<unit>`. Labels carry only bounded values (route kinds, configured upstream
//! names, status codes): never a repository, a digest or anything a client typed.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// API requests answered, by route kind, method and status code.
    pub http_requests: IntCounterVec,
    /// Time to answer (headers sent), by route kind.
    pub http_duration: HistogramVec,
    /// Requests served from the cache, by kind (`manifest`, `blob`, `tag`).
    pub cache_hits: IntCounterVec,
    /// Requests that needed the upstream, by kind.
    pub cache_misses: IntCounterVec,
    /// Requests that joined a download another request had started, by kind.
    pub cache_coalesced: IntCounterVec,
    /// Tags served from the cache past their TTL because the upstream could not be asked.
    pub stale_served: IntCounterVec,
    /// Body bytes sent to clients, by where they came from (`cache`, `upstream`).
    pub served_bytes: IntCounterVec,
    /// Upstream requests by upstream and status code (`error` when no response came).
    pub upstream_requests: IntCounterVec,
    /// Upstream response time (to headers), by upstream.
    pub upstream_duration: HistogramVec,
    /// Upstream failures by upstream and kind (`connect`, `timeout`, `body`, `status`, `token`).
    pub upstream_errors: IntCounterVec,
    /// Downloads whose bytes did not match their digest (or size), by upstream.
    pub digest_mismatches: IntCounterVec,
    /// Downloads from upstreams in progress.
    pub fetches_in_flight: IntGauge,
    /// Objects and bytes evicted, by reason (`size`, `quota`, `age`, `manual`).
    pub evictions: IntCounterVec,
    pub evicted_bytes: IntCounterVec,
    /// Downloads that could not be kept because the cache's disk was full.
    pub disk_full: IntCounter,
    /// Bytes and objects in the cache.
    pub cache_size_bytes: IntGauge,
    pub cache_objects: IntGauge,
    /// `cache.limits.max_size` in bytes (a share resolved against the filesystem); 0: none.
    pub cache_limit_bytes: IntGauge,
    /// Refused credentials, by reason (`bad_password`, `unknown_token`, ...).
    pub auth_failures: IntCounterVec,
    /// Client addresses locked out after repeated failures.
    pub auth_lockouts: IntCounter,
    /// Requests refused by the access policy, by answer (`unauthorized`, `denied`, `locked_out`).
    pub auth_refused: IntCounterVec,
    /// Build information, value 1.
    pub build_info: IntGaugeVec,
    /// Credential sources loaded with a change (the first load included).
    pub credentials_reloads: IntCounter,
    /// Credential sources that could not be read or parsed (the last good version was kept).
    pub credentials_reload_errors: IntCounter,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)
                .expect("metric definitions are static");
            registry
                .register(Box::new(c.clone()))
                .expect("each metric is registered once");
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                labels,
            )
            .expect("metric definitions are static");
            registry
                .register(Box::new(h.clone()))
                .expect("each metric is registered once");
            h
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("metric definitions are static");
            registry
                .register(Box::new(g.clone()))
                .expect("each metric is registered once");
            g
        };
        let plain_counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("metric definitions are static");
            registry
                .register(Box::new(c.clone()))
                .expect("each metric is registered once");
            c
        };
        let build_info = IntGaugeVec::new(
            Opts::new("regcache_build_info", "regcache version, value 1"),
            &["version"],
        )
        .expect("metric definitions are static");
        registry
            .register(Box::new(build_info.clone()))
            .expect("registered once");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let auth_lockouts = IntCounter::new(
            "regcache_auth_lockouts_total",
            "Client addresses locked out after repeated authentication failures",
        )
        .expect("metric definitions are static");
        registry
            .register(Box::new(auth_lockouts.clone()))
            .expect("registered once");
        Metrics {
            http_requests: counter(
                "regcache_http_requests_total",
                "API requests answered, by route, method and status",
                &["route", "method", "status"],
            ),
            http_duration: histogram(
                "regcache_http_request_duration_seconds",
                "Time until response headers were ready, by route",
                &["route"],
            ),
            cache_hits: counter(
                "regcache_cache_hits_total",
                "Requests served from the cache, by kind",
                &["kind"],
            ),
            cache_misses: counter(
                "regcache_cache_misses_total",
                "Requests that needed the upstream, by kind",
                &["kind"],
            ),
            cache_coalesced: counter(
                "regcache_cache_coalesced_total",
                "Requests that joined a download already in progress, by kind",
                &["kind"],
            ),
            stale_served: counter(
                "regcache_cache_stale_served_total",
                "Tags served past their TTL because the upstream failed, by upstream",
                &["upstream"],
            ),
            served_bytes: counter(
                "regcache_served_bytes_total",
                "Body bytes sent to clients, by source (cache, upstream)",
                &["source"],
            ),
            upstream_requests: counter(
                "regcache_upstream_requests_total",
                "Requests to upstreams, by upstream and status (error: no response)",
                &["upstream", "status"],
            ),
            upstream_duration: histogram(
                "regcache_upstream_request_duration_seconds",
                "Upstream time to response headers, by upstream",
                &["upstream"],
            ),
            upstream_errors: counter(
                "regcache_upstream_errors_total",
                "Upstream failures, by upstream and kind (connect, timeout, body, status, token)",
                &["upstream", "kind"],
            ),
            digest_mismatches: counter(
                "regcache_digest_mismatches_total",
                "Downloads refused because their bytes did not match the digest or size, by upstream",
                &["upstream"],
            ),
            fetches_in_flight: gauge(
                "regcache_upstream_fetches_in_flight",
                "Blob downloads from upstreams in progress",
            ),
            evictions: counter(
                "regcache_evictions_total",
                "Blobs and manifests evicted from the cache, by reason (size, quota, age, manual)",
                &["reason"],
            ),
            evicted_bytes: counter(
                "regcache_evicted_bytes_total",
                "Bytes evicted from the cache, by reason (size, quota, age, manual)",
                &["reason"],
            ),
            disk_full: {
                let c = IntCounter::new(
                    "regcache_cache_disk_full_total",
                    "Downloads streamed to clients but not kept because the cache's disk was full",
                )
                .expect("metric definitions are static");
                registry
                    .register(Box::new(c.clone()))
                    .expect("each metric is registered once");
                c
            },
            cache_size_bytes: gauge("regcache_cache_size_bytes", "Bytes of content in the cache"),
            cache_objects: gauge("regcache_cache_objects", "Blobs and manifests in the cache"),
            cache_limit_bytes: gauge(
                "regcache_cache_limit_bytes",
                "The cache's size limit (cache.limits.max_size) in bytes; 0 when unlimited",
            ),
            credentials_reloads: plain_counter(
                "regcache_credentials_reloads_total",
                "Credential sources loaded with a change, the first load included",
            ),
            credentials_reload_errors: plain_counter(
                "regcache_credentials_reload_errors_total",
                "Credential sources that could not be read or parsed; the last good version was kept",
            ),
            auth_failures: counter(
                "regcache_auth_failures_total",
                "Refused client credentials, by reason",
                &["reason"],
            ),
            auth_lockouts,
            auth_refused: counter(
                "regcache_auth_refused_total",
                "Requests refused by access control, by answer (unauthorized, denied, locked_out)",
                &["answer"],
            ),
            build_info,
            registry,
        }
    }

    /// Creates every labelled series at zero, so a first event shows as an increase (an alert
    /// on `increase(...) > 0` sees the first digest mismatch, not a series appearing at 1).
    pub fn prime<'a>(&self, upstreams: impl IntoIterator<Item = &'a str>) {
        for kind in ["manifest", "tag", "blob"] {
            self.cache_hits.with_label_values(&[kind]);
            self.cache_misses.with_label_values(&[kind]);
            self.cache_coalesced.with_label_values(&[kind]);
        }
        for reason in crate::store::Reason::ALL {
            self.evictions.with_label_values(&[reason.as_str()]);
            self.evicted_bytes.with_label_values(&[reason.as_str()]);
        }
        for reason in crate::access::Failure::ALL {
            self.auth_failures.with_label_values(&[reason.as_str()]);
        }
        for answer in ["unauthorized", "denied", "locked_out"] {
            self.auth_refused.with_label_values(&[answer]);
        }
        for source in ["cache", "upstream"] {
            self.served_bytes.with_label_values(&[source]);
        }
        for upstream in upstreams {
            self.stale_served.with_label_values(&[upstream]);
            self.digest_mismatches.with_label_values(&[upstream]);
            self.upstream_duration.with_label_values(&[upstream]);
            for kind in ["connect", "timeout", "body", "status", "token", "invalid"] {
                self.upstream_errors.with_label_values(&[upstream, kind]);
            }
        }
    }

    /// The Prometheus text exposition of everything registered.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to a Vec cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
