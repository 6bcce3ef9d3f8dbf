//! HTTPS on the mirror's listener: HTTP/2 and HTTP/1.1 by ALPN, a renewed certificate taken up
//! by new connections while an open one keeps working, and client certificates whose subject
//! is an identity the access rules can name.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use reqwest::StatusCode;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{cache_dir, within};
use crate::support::fake_upstream::{FakeUpstream, Image};
use crate::support::mirror::{Mirror, MirrorBuilder, REQUEST_TIMEOUT};

/// A test CA issuing server and client certificates.
struct Ca {
    cert: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("CA cert");
        Ca {
            cert,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// (certificate PEM, key PEM, certificate DER).
    fn issue(
        &self,
        sans: &[&str],
        cn: &str,
        client: bool,
    ) -> (String, String, CertificateDer<'static>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(sans).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = params.signed_by(&key, &self.issuer).expect("cert");
        (cert.pem(), key.serialize_pem(), cert.der().clone())
    }
}

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        Files {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes through a temporary file and a rename, as a Secret update lands.
    fn write(&self, name: &str, text: &str) {
        let tmp = self.path(&format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write");
        std::fs::rename(&tmp, self.path(name)).expect("rename");
    }
}

fn q(p: &Path) -> String {
    serde_json::to_string(&p.to_string_lossy()).expect("string")
}

fn https_client(ca: &Ca, identity: Option<(&str, &str)>, http1_only: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .tls_certs_only([reqwest::Certificate::from_pem(ca.cert.pem().as_bytes()).expect("CA")]);
    if let Some((cert, key)) = identity {
        b = b.identity(
            reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).expect("identity"),
        );
    }
    if http1_only {
        b = b.http1_only();
    }
    b.build().expect("client")
}

/// A raw TLS connection speaking HTTP/1.1 keep-alive, to hold one connection open.
struct RawConn {
    stream: tokio_rustls::client::TlsStream<TcpStream>,
}

impl RawConn {
    async fn open(mirror: &Mirror, ca: &Ca) -> RawConn {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert.der().clone()).expect("root");
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(mirror.addr()).await.expect("connect");
        let name = ServerName::try_from("localhost").expect("name");
        let stream = within("TLS handshake", connector.connect(name, tcp))
            .await
            .expect("handshake");
        RawConn { stream }
    }

    fn peer_certificate(&self) -> CertificateDer<'static> {
        self.stream
            .get_ref()
            .1
            .peer_certificates()
            .expect("server certs")[0]
            .clone()
    }

    /// GET /healthz on this connection; the body.
    async fn healthz(&mut self) -> String {
        self.stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .expect("write request");
        let mut buf = Vec::new();
        let read = async {
            let mut chunk = [0u8; 1024];
            while !buf.ends_with(b"\r\n\r\nok\n") {
                let n = self.stream.read(&mut chunk).await.expect("read response");
                assert!(n > 0, "the connection was closed");
                buf.extend_from_slice(&chunk[..n]);
            }
        };
        within("a response on the open connection", read).await;
        String::from_utf8_lossy(&buf).into_owned()
    }
}

#[tokio::test]
async fn https_serves_h2_and_http1_and_takes_up_a_renewed_certificate_without_dropping_connections()
{
    let ca = Ca::new("regcache test CA");
    let files = Files::new();
    let (cert_a, key_a, der_a) = ca.issue(&["localhost", "127.0.0.1"], "mirror", false);
    files.write("tls.crt", &cert_a);
    files.write("tls.key", &key_a);
    let image = Image::new(1, 1024);
    let up = FakeUpstream::builder()
        .image("team/app", "v1", &image)
        .start()
        .await;
    let cache = cache_dir();
    let mirror = MirrorBuilder::new(cache.path())
        .upstream(&up.host(), &up.url())
        .tls(&format!(
            "  cert_file: {}\n  key_file: {}\n  reload_interval: 50ms\n",
            q(&files.path("tls.crt")),
            q(&files.path("tls.key"))
        ))
        .start()
        .await;
    let base = format!("https://127.0.0.1:{}", mirror.addr().port());
    let h2 = https_client(&ca, None, false);
    let r = h2
        .get(format!("{base}/v2/team/app/manifests/v1"))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .await
        .expect("https request");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.version(), reqwest::Version::HTTP_2, "ALPN picks h2");
    assert_eq!(r.bytes().await.expect("body"), image.manifest.bytes);
    let h1 = https_client(&ca, None, true);
    let r = h1
        .get(format!("{base}/v2/"))
        .send()
        .await
        .expect("https request");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.version(), reqwest::Version::HTTP_11);

    // An open connection, then the certificate is renewed.
    let mut open = RawConn::open(&mirror, &ca).await;
    assert_eq!(open.peer_certificate(), der_a);
    assert!(open.healthz().await.starts_with("HTTP/1.1 200"));
    let (cert_b, key_b, der_b) = ca.issue(&["localhost", "127.0.0.1"], "mirror renewed", false);
    files.write("tls.key", &key_b);
    files.write("tls.crt", &cert_b);
    let renewed = async {
        loop {
            let conn = RawConn::open(&mirror, &ca).await;
            if conn.peer_certificate() == der_b {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    };
    within("new connections getting the renewed certificate", renewed).await;
    assert!(
        open.healthz().await.starts_with("HTTP/1.1 200"),
        "the connection opened before the renewal still works"
    );

    // A broken renewal keeps the current certificate.
    files.write("tls.crt", "not a certificate");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let conn = RawConn::open(&mirror, &ca).await;
    assert_eq!(conn.peer_certificate(), der_b);
}

#[tokio::test]
async fn a_client_certificate_subject_is_an_identity() {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let other_ca = Ca::new("someone else's CA");
    let files = Files::new();
    let (cert, key, _) = server_ca.issue(&["localhost", "127.0.0.1"], "mirror", false);
    files.write("tls.crt", &cert);
    files.write("tls.key", &key);
    files.write("ca.crt", &client_ca.cert.pem());
    let image = Image::new(1, 1024);
    let up = FakeUpstream::builder()
        .image("team/app", "v1", &image)
        .start()
        .await;
    let cache = cache_dir();
    let tls = |mode: &str| {
        format!(
            "  cert_file: {}\n  key_file: {}\n  client_ca_file: {}\n  client_auth: {mode}\n  reload_interval: 50ms\n",
            q(&files.path("tls.crt")),
            q(&files.path("tls.key")),
            q(&files.path("ca.crt")),
        )
    };
    let access = "  enabled: true\n  rules:\n    - who: [\"subject:CN=node-1\"]\n      repositories: [\"**\"]\n";
    let mirror = MirrorBuilder::new(cache.path())
        .upstream(&up.host(), &up.url())
        .tls(&tls("optional"))
        .access(access)
        .start()
        .await;
    let url = format!(
        "https://127.0.0.1:{}/v2/team/app/manifests/v1",
        mirror.addr().port()
    );
    let (node1_cert, node1_key, _) = client_ca.issue(&[], "node-1", true);
    let (node2_cert, node2_key, _) = client_ca.issue(&[], "node-2", true);
    let (forged_cert, forged_key, _) = other_ca.issue(&[], "node-1", true);
    let get = |client: reqwest::Client| {
        let url = url.clone();
        async move {
            client
                .get(url)
                .header("accept", "application/vnd.oci.image.manifest.v1+json")
                .send()
                .await
        }
    };
    let r = get(https_client(
        &server_ca,
        Some((&node1_cert, &node1_key)),
        false,
    ))
    .await
    .expect("request");
    assert_eq!(r.status(), StatusCode::OK, "node-1 is allowed");
    let r = get(https_client(
        &server_ca,
        Some((&node2_cert, &node2_key)),
        false,
    ))
    .await
    .expect("request");
    assert_eq!(
        r.status(),
        StatusCode::FORBIDDEN,
        "node-2 is known, not allowed"
    );
    let r = get(https_client(&server_ca, None, false))
        .await
        .expect("request");
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "no certificate: anonymous"
    );
    assert!(
        get(https_client(
            &server_ca,
            Some((&forged_cert, &forged_key)),
            false
        ))
        .await
        .is_err(),
        "a certificate from another CA fails the handshake"
    );
    // The client CA bundle is rotated to the other CA: its node-1 is now the trusted one.
    files.write("ca.crt", &other_ca.cert.pem());
    let rotated = async {
        loop {
            let client = https_client(&server_ca, Some((&forged_cert, &forged_key)), false);
            if get(client)
                .await
                .is_ok_and(|r| r.status() == StatusCode::OK)
            {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    };
    within("the new client CA bundle to take effect", rotated).await;
    drop(mirror);

    let cache2 = cache_dir();
    let strict = MirrorBuilder::new(cache2.path())
        .upstream(&up.host(), &up.url())
        .tls(&tls("required"))
        .access(access)
        .start()
        .await;
    let url = format!(
        "https://127.0.0.1:{}/v2/team/app/manifests/v1",
        strict.addr().port()
    );
    let r = https_client(&server_ca, None, false).get(&url).send().await;
    assert!(r.is_err(), "required: no certificate, no connection");
    let r = https_client(&server_ca, Some((&forged_cert, &forged_key)), false)
        .get(&url)
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), StatusCode::OK);
}
