//! Manifest media types and the `Accept` negotiation a mirror must honour: a cached manifest is
//! served for a request only if the client said it accepts that media type.

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// What a client asked for, from all of its `Accept` header lines (skopeo and podman send one
/// line per type; containerd sends one comma-joined line).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Accept {
    ranges: Vec<String>,
}

impl Accept {
    pub fn from_lines<'a>(lines: impl IntoIterator<Item = &'a str>) -> Accept {
        let ranges = lines
            .into_iter()
            .flat_map(|line| line.split(','))
            .filter_map(|range| {
                let essence = range.split(';').next().unwrap_or_default().trim();
                (!essence.is_empty()).then(|| essence.to_ascii_lowercase())
            })
            .collect();
        Accept { ranges }
    }

    /// Every manifest kind the mirror can store. A manifest fetched by digest is the same bytes
    /// whatever the client accepts, but registries (Distribution among them) refuse OCI
    /// manifests to requests that do not list OCI types.
    pub fn any_manifest() -> Accept {
        Accept {
            ranges: [
                OCI_MANIFEST,
                OCI_INDEX,
                DOCKER_MANIFEST_V2,
                DOCKER_MANIFEST_LIST,
                "*/*",
            ]
            .map(String::from)
            .to_vec(),
        }
    }

    /// The header lines to forward upstream, preserving the client's order.
    pub fn ranges(&self) -> &[String] {
        &self.ranges
    }

    /// Whether a response of `media_type` satisfies this request. No `Accept` at all accepts
    /// anything, as registries treat it.
    pub fn accepts(&self, media_type: &str) -> bool {
        if self.ranges.is_empty() {
            return true;
        }
        let essence = media_type.split(';').next().unwrap_or_default().trim();
        let (ty, _) = essence.split_once('/').unwrap_or((essence, ""));
        self.ranges.iter().any(|r| {
            r == "*/*"
                || r.eq_ignore_ascii_case(essence)
                || r.strip_suffix("/*")
                    .is_some_and(|t| t.eq_ignore_ascii_case(ty))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_line_and_comma_list() {
        let a = Accept::from_lines([
            "application/vnd.oci.image.index.v1+json, */*;q=0.8",
            DOCKER_MANIFEST_V2,
        ]);
        assert_eq!(a.ranges().len(), 3);
        assert!(a.accepts(OCI_INDEX));
        assert!(a.accepts("anything/else"));
    }

    #[test]
    fn refuses_types_not_listed() {
        let a = Accept::from_lines([DOCKER_MANIFEST_V2]);
        assert!(a.accepts(DOCKER_MANIFEST_V2));
        assert!(!a.accepts(OCI_INDEX));
        assert!(Accept::default().accepts(OCI_INDEX));
        assert!(Accept::from_lines(["application/*"]).accepts(OCI_MANIFEST));
    }
}
