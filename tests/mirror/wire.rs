//! HTTP/1.1 on the wire, as clients other than a well-behaved library send it: several requests
//! pipelined on one connection, HTTP/1.0 clients, request bodies the mirror never reads, and
//! malformed or oversized request heads. Cached blobs leave by `sendfile`; these tests read the
//! raw bytes to check the framing around them is exact.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::{cache_dir, get_blob, mirror_for, within};
use reqwest::StatusCode;

use crate::support::fake_upstream::{FakeUpstream, Fault, Image, sha256_digest};

/// One response read off a raw connection.
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A client connection that reads responses exactly as framed by their headers.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        let stream = within("connecting", TcpStream::connect(addr))
            .await
            .expect("the mirror accepts connections");
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        within("sending", self.stream.write_all(bytes))
            .await
            .expect("the mirror reads requests");
    }

    /// Reads more bytes; false at the end of the connection.
    async fn fill(&mut self) -> bool {
        let mut chunk = vec![0; 64 * 1024];
        let n = within("reading from the mirror", self.stream.read(&mut chunk))
            .await
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    /// Reads one response; `head_request` means no body follows whatever the headers say.
    async fn response(&mut self, head_request: bool) -> RawResponse {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(
                self.fill().await,
                "the connection ended inside a response head"
            );
        };
        let head = String::from_utf8(self.buf[..head_end].to_vec()).expect("a text head");
        self.buf.drain(..head_end);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().expect("a status line");
        assert!(status_line.starts_with("HTTP/1.1 "), "{status_line:?}");
        let status = status_line[9..12].parse().expect("a status code");
        let headers: Vec<(String, String)> = lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (n, v) = l.split_once(':').expect("name: value");
                (n.trim().to_owned(), v.trim().to_owned())
            })
            .collect();
        let mut response = RawResponse {
            status,
            headers,
            body: Vec::new(),
        };
        if head_request {
            return response;
        }
        if let Some(length) = response.header("content-length") {
            let length: usize = length.parse().expect("a numeric Content-Length");
            while self.buf.len() < length {
                assert!(self.fill().await, "the connection ended inside a body");
            }
            response.body = self.buf.drain(..length).collect();
        } else {
            // Read to the end of the connection (HTTP/1.0 framing).
            while self.fill().await {}
            response.body = std::mem::take(&mut self.buf);
        }
        response
    }

    /// True when the mirror has closed the connection (and sent nothing more).
    async fn closed(&mut self) -> bool {
        !self.fill().await && self.buf.is_empty()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_on_one_connection_get_exact_answers_in_order() {
    let image = Image::new(1, 300 * 1024);
    let layer = image.layers[0].clone();
    let up = FakeUpstream::builder()
        .image("team/app", "v1", &image)
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).start().await;
    // Cache the layer first, so it leaves by the stored-file path.
    get_blob(&mirror, "team/app", &layer.digest).await;

    let blob = format!("/v2/team/app/blobs/{}", layer.digest);
    let mut raw = Raw::connect(mirror.addr()).await;
    let requests = format!(
        "GET {blob} HTTP/1.1\r\nHost: m\r\n\r\n\
         HEAD {blob} HTTP/1.1\r\nHost: m\r\n\r\n\
         GET {blob} HTTP/1.1\r\nHost: m\r\nRange: bytes=1000-1999\r\n\r\n\
         GET /v2/team/app/manifests/v1 HTTP/1.1\r\nHost: m\r\n\
         Accept: application/vnd.oci.image.manifest.v1+json\r\n\r\n"
    );
    raw.send(requests.as_bytes()).await;

    let whole = raw.response(false).await;
    assert_eq!(whole.status, 200);
    assert_eq!(sha256_digest(&whole.body), layer.digest);
    let head = raw.response(true).await;
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(layer.size().to_string().as_str())
    );
    let part = raw.response(false).await;
    assert_eq!(part.status, 206);
    assert_eq!(part.body, layer.bytes[1000..2000]);
    assert_eq!(
        part.header("content-range"),
        Some(format!("bytes 1000-1999/{}", layer.size()).as_str())
    );
    let manifest = raw.response(false).await;
    assert_eq!(manifest.status, 200);
    assert_eq!(
        manifest.header("docker-content-digest"),
        Some(image.manifest.digest.as_str())
    );
    assert_eq!(manifest.body, image.manifest.bytes[..]);
    assert!(manifest.header("date").is_some(), "responses carry a Date");
    mirror.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_client_gets_whole_answers_and_the_connection_closes() {
    let image = Image::new(1, 100 * 1024);
    let layer = image.layers[0].clone();
    let up = FakeUpstream::builder()
        .image("team/app", "v1", &image)
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).start().await;

    // Cold (streamed while it downloads), then warm (from the stored file).
    for _ in 0..2 {
        let mut raw = Raw::connect(mirror.addr()).await;
        let request = format!("GET /v2/team/app/blobs/{} HTTP/1.0\r\n\r\n", layer.digest);
        raw.send(request.as_bytes()).await;
        let response = raw.response(false).await;
        assert_eq!(response.status, 200);
        assert_eq!(sha256_digest(&response.body), layer.digest);
        assert_eq!(response.header("connection"), Some("close"));
        assert!(
            raw.closed().await,
            "an HTTP/1.0 connection ends after one answer"
        );
    }
    assert_eq!(up.gets_of_blob(&layer.digest), 1);
    mirror.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_with_a_body_is_refused_and_its_connection_closed() {
    let up = FakeUpstream::builder().start().await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).start().await;

    let mut raw = Raw::connect(mirror.addr()).await;
    raw.send(
        b"PUT /v2/team/app/manifests/v1 HTTP/1.1\r\nHost: m\r\n\
          Content-Type: application/vnd.oci.image.manifest.v1+json\r\n\
          Content-Length: 11\r\n\r\n{\"a\": \"b\"}\n",
    )
    .await;
    let response = raw.response(false).await;
    assert_eq!(response.status, 405);
    let json: serde_json::Value =
        serde_json::from_slice(&response.body).expect("an OCI error body");
    assert_eq!(json["errors"][0]["code"], "UNSUPPORTED");
    assert_eq!(response.header("connection"), Some("close"));
    assert!(
        raw.closed().await,
        "the unread body is never taken for a next request"
    );
    assert_eq!(up.requests().len(), 0, "nothing reached the upstream");
    mirror.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_request_heads_are_refused() {
    let up = FakeUpstream::builder().start().await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).start().await;

    let huge = format!(
        "GET /v2/ HTTP/1.1\r\nHost: m\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let cases: [(&[u8], u16); 4] = [
        (b"GET /v2/ HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
        (b"GET /v2/ HTTP/1.1\r\nContent-Length: lots\r\n\r\n", 400),
        (b"GET /v2/ HTTP/3.0\r\n\r\n", 400),
        (huge.as_bytes(), 431),
    ];
    for (request, status) in cases {
        let mut raw = Raw::connect(mirror.addr()).await;
        raw.send(request).await;
        let response = raw.response(false).await;
        assert_eq!(
            response.status,
            status,
            "{:?}",
            String::from_utf8_lossy(&request[..request.len().min(40)])
        );
        assert!(
            raw.closed().await,
            "the connection closes after the refusal"
        );
    }
    // The mirror goes on serving.
    let mut raw = Raw::connect(mirror.addr()).await;
    raw.send(b"GET /v2/ HTTP/1.1\r\nHost: m\r\n\r\n").await;
    assert_eq!(raw.response(false).await.status, 200);
    mirror.stop().await;
}

/// Everything the mirror sends on a raw connection until it closes or resets it.
async fn read_to_end(raw: &mut Raw) -> Vec<u8> {
    while raw.fill().await {}
    std::mem::take(&mut raw.buf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_without_a_length_reaches_http_1_0_clients_whole_and_verified() {
    let image = Image::new(1, 200 * 1024);
    let layer = image.layers[0].clone();
    let up = FakeUpstream::builder()
        .image("team/app", "v1", &image)
        .fault(Fault::on_blob(&layer.digest).without_length())
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).start().await;

    let mut raw = Raw::connect(mirror.addr()).await;
    let request = format!("GET /v2/team/app/blobs/{} HTTP/1.0\r\n\r\n", layer.digest);
    raw.send(request.as_bytes()).await;
    let response = raw.response(false).await;
    assert_eq!(response.status, 200);
    assert_eq!(
        response.header("content-length"),
        Some(layer.size().to_string().as_str()),
        "an HTTP/1.0 client is told the length, so it can tell a whole body from a cut one"
    );
    assert_eq!(sha256_digest(&response.body), layer.digest);
    mirror.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_download_without_a_length_never_looks_whole_to_any_client() {
    let image = Image::new(1, 200 * 1024);
    let layer = image.layers[0].clone();
    let up = FakeUpstream::builder()
        .image("team/app", "v1", &image)
        .fault(Fault::on_blob(&layer.digest).without_length())
        .fault(Fault::on_blob(&layer.digest).wrong_bytes())
        .start()
        .await;
    let dir = cache_dir();
    let mirror = mirror_for(&up, &dir).attempts(1).start().await;
    let path = format!("/v2/team/app/blobs/{}", layer.digest);
    let corrupt: Vec<u8> = layer.bytes.iter().map(|b| !b).collect();

    // HTTP/1.0: the end of the connection would end the body, so nothing may be sent unverified.
    let mut raw = Raw::connect(mirror.addr()).await;
    raw.send(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await;
    let received = read_to_end(&mut raw).await;
    let whole_200 = received.starts_with(b"HTTP/1.1 200") && received.ends_with(&corrupt);
    assert!(
        !whole_200,
        "an HTTP/1.0 client received the corrupt blob as a complete answer"
    );

    // HTTP/1.1: chunked, and the body ends with an error instead of its last chunk.
    let response = mirror.get(&path).await;
    assert_eq!(response.status(), StatusCode::OK);
    let received = super::read_until_end_or_error(response).await;
    assert!(
        received.error.is_some(),
        "the chunked body of a corrupt download ends with an error"
    );
    assert!(mirror.metric("regcache_digest_mismatches_total", &[]).await >= 1.0);
    mirror.stop().await;
}
