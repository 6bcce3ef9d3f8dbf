//! Tag lists and referrers are passed through from the upstream the client addressed, and a
//! tag list's next page stays with that upstream and repository.

use reqwest::StatusCode;
use serde_json::Value;

use super::{body, cache_dir, header};
use crate::support::fake_upstream::{FakeUpstream, Image, OCI_INDEX};
use crate::support::mirror::{Mirror, MirrorBuilder};

/// Every tag of a paginated list, following `Link: <...>; rel="next"` through the mirror.
async fn all_tags(mirror: &Mirror, first_page: &str) -> Vec<String> {
    let mut tags = Vec::new();
    let mut next = Some(first_page.to_owned());
    let mut pages = 0;
    while let Some(path) = next.take() {
        pages += 1;
        assert!(pages <= 10, "pagination ends");
        let response = mirror.get(&path).await;
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        next = header(&response, "link").map(|link| {
            let target = link
                .split_once('<')
                .and_then(|(_, rest)| rest.split_once('>'))
                .map(|(target, _)| target.to_owned())
                .unwrap_or_else(|| panic!("a Link target: {link}"));
            target
                .strip_prefix(&mirror.url())
                .map(str::to_owned)
                .unwrap_or(target)
        });
        let json: Value = serde_json::from_slice(&body(response).await).expect("a JSON tag list");
        tags.extend(
            json["tags"]
                .as_array()
                .expect("a tags array")
                .iter()
                .map(|t| t.as_str().expect("a tag").to_owned()),
        );
    }
    tags
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tag_lists_and_referrers_come_from_the_addressed_upstream() {
    let image = Image::new(1, 1000);
    let default = FakeUpstream::builder()
        .image("team/app", "only-on-default", &image)
        .start()
        .await;
    let other = FakeUpstream::builder()
        .image("team/app", "a", &image)
        .image("team/app", "b", &image)
        .image("team/app", "c", &image)
        .start()
        .await;
    let dir = cache_dir();
    let mirror = MirrorBuilder::new(dir.path())
        .upstream(&default.host(), &default.url())
        .upstream(&other.host(), &other.url())
        .start()
        .await;
    let expected = ["a", "b", "c"].map(str::to_owned).to_vec();

    assert_eq!(
        all_tags(
            &mirror,
            &format!("/v2/team/app/tags/list?ns={}", other.host())
        )
        .await,
        expected,
        "all pages of a list addressed with ns"
    );
    assert_eq!(
        all_tags(&mirror, &format!("/v2/{}/team/app/tags/list", other.host())).await,
        expected,
        "all pages of a list addressed with a host prefix"
    );
    assert_eq!(
        all_tags(&mirror, "/v2/team/app/tags/list").await,
        ["only-on-default"],
        "no ns, no prefix: the default upstream's list"
    );

    let response = mirror
        .get(&format!(
            "/v2/team/app/referrers/{}?ns={}",
            image.manifest.digest,
            other.host()
        ))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(&response, "content-type").as_deref(),
        Some(OCI_INDEX)
    );
    let json: Value = serde_json::from_slice(&body(response).await).expect("a referrers index");
    assert_eq!(json["manifests"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_paginated_tag_list_leads_to_its_next_page_on_the_same_upstream() {
    let image = Image::new(1, 1000);
    let default = FakeUpstream::builder()
        .image("team/app", "only-on-default", &image)
        .start()
        .await;
    let other = FakeUpstream::builder()
        .image("team/app", "a", &image)
        .image("team/app", "b", &image)
        .image("team/app", "c", &image)
        .start()
        .await;
    let dir = cache_dir();
    let mirror = MirrorBuilder::new(dir.path())
        .upstream(&default.host(), &default.url())
        .upstream(&other.host(), &other.url())
        .start()
        .await;
    let expected = ["a", "b", "c"].map(str::to_owned).to_vec();

    // skopeo list-tags and crane ls follow the Link header as given.
    assert_eq!(
        all_tags(
            &mirror,
            &format!("/v2/team/app/tags/list?ns={}&n=2", other.host())
        )
        .await,
        expected,
        "pages of a list addressed with ns"
    );
    assert_eq!(
        all_tags(
            &mirror,
            &format!("/v2/{}/team/app/tags/list?n=2", other.host())
        )
        .await,
        expected,
        "pages of a list addressed with a host prefix"
    );
}
