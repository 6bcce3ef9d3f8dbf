//! regcache's own HTTP/1.1 connection loop for the plain-text listener.
//!
//! Why not hyper here: a cached blob is a file, and the cheapest way from a file to a socket is
//! `sendfile(2)`, which keeps the bytes in the kernel (no read into a buffer, no copy back out).
//! hyper can only write bodies from memory, so on plain HTTP/1.1 this loop parses each request
//! head (`httparse`, hyper's own parser), calls the same `handle` as every other path, and writes
//! the response itself: a stored blob carrying a [`FileRegion`] goes out by `sendfile`, every
//! other body is written frame by frame (Content-Length or chunked). TLS and HTTP/2 stay with
//! hyper: a connection that opens with the HTTP/2 preface (h2c with prior knowledge) is handed
//! to hyper's HTTP/2 server with the bytes already read.
//!
//! What this loop does not do: read request bodies. The mirror accepts none (pushes are refused
//! before any body matters), so a request that announces one gets its answer and the connection
//! is closed instead of being drained.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::FutureExt;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::body::{Body, FileRegion, GrowingFile};
use super::{App, ConnInfo};
use crate::cache::coalesce::{GrowingReader, Piece};

/// Largest request head accepted (request line and headers); larger gets 431.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;
/// Responses whose head and body fit in this many bytes leave in one write.
const COALESCE: usize = 64 * 1024;
/// Most bytes handed to one `sendfile` call; the socket's buffer bounds it further.
const MAX_SENDFILE: u64 = 16 << 20;
/// HTTP/2 connections are pinged this often, and closed when a ping goes unanswered this long.
pub(super) const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
pub(super) const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest a write may wait for the client to read before the connection is given up.
const WRITE_STALL: Duration = Duration::from_secs(60);
/// How long, and how many bytes, a closing connection keeps reading what the client still sends.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves one accepted connection until the client closes it, an error ends it, or `stop` is
/// cancelled (then an idle connection closes at once and a busy one after its response).
pub async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    app: Arc<App>,
    header_timeout: Duration,
    stop: CancellationToken,
) -> io::Result<()> {
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut out = Vec::with_capacity(1024);
    let mut first = true;
    loop {
        let head = read_head(&mut stream, &mut buf, header_timeout, &stop, first).await?;
        first = false;
        let head = match head {
            Head::Request(head) => head,
            Head::Closed => return Ok(()),
            Head::Http2 => return serve_h2(stream, buf, peer, app, stop).await,
            Head::Bad(status) => {
                let resp = plain_error(status);
                let request = (Version::HTTP_11, false);
                write_response(&mut stream, &mut out, resp, request, false, &app).await?;
                return linger_close(stream).await;
            }
        };
        let Parsed {
            mut request,
            keep_alive,
            has_body,
        } = *head;
        request.extensions_mut().insert(ConnInfo {
            remote: peer,
            client_subject: None,
        });
        let is_head = request.method() == Method::HEAD;
        let version = request.version();
        let resp = super::handle(app.clone(), request).await;
        let keep = keep_alive && !has_body && !stop.is_cancelled();
        let written =
            write_response(&mut stream, &mut out, resp, (version, is_head), keep, &app).await;
        let keep = match written {
            Ok(keep) => keep,
            Err(e) => {
                // A body that failed must never look complete: a reset, not a clean close.
                reset_on_close(&stream);
                return Err(e);
            }
        };
        if !keep {
            return linger_close(stream).await;
        }
    }
}

/// Ends a connection whose client may still be sending (an unread request body, the rest of an
/// oversized head): closing a socket with unread input makes the kernel send a reset, which can
/// destroy the answer before the client reads it. So: finish our side, then read and discard,
/// bounded in time and bytes, until the client closes too.
async fn linger_close(mut stream: TcpStream) -> io::Result<()> {
    stream.shutdown().await?;
    let drain = async {
        let mut sink = [0u8; 16 * 1024];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
    Ok(())
}

struct Parsed {
    request: Request<()>,
    keep_alive: bool,
    /// The request announced a body, which is never read: the connection closes after the answer.
    has_body: bool,
}

enum Head {
    Request(Box<Parsed>),
    /// The client closed the connection, went idle past the deadline, or shutdown began while
    /// it was idle.
    Closed,
    /// The connection opened with the HTTP/2 preface.
    Http2,
    /// A malformed head: answered with this status, then the connection closes.
    Bad(StatusCode),
}

async fn read_head(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    timeout: Duration,
    stop: &CancellationToken,
    first: bool,
) -> io::Result<Head> {
    let deadline = Instant::now() + timeout;
    loop {
        if first && buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(buf) && !buf.is_empty() {
            // Could still be the HTTP/2 preface: read on.
        } else if first && buf.starts_with(H2_PREFACE) {
            return Ok(Head::Http2);
        } else if !buf.is_empty() {
            match parse(buf) {
                Ok(Some(parsed)) => return Ok(Head::Request(Box::new(parsed))),
                Ok(None) if buf.len() >= MAX_HEAD => {
                    return Ok(Head::Bad(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
                }
                Ok(None) => {}
                Err(status) => return Ok(Head::Bad(status)),
            }
        }
        let idle = buf.is_empty();
        let read = tokio::select! {
            // Shutdown closes connections waiting for a request (or the rest of its head);
            // responses under way finish.
            _ = stop.cancelled() => return Ok(Head::Closed),
            read = tokio::time::timeout_at(deadline, stream.read_buf(buf)) => read,
        };
        match read {
            Err(_elapsed) if idle => return Ok(Head::Closed),
            Err(_elapsed) => return Ok(Head::Bad(StatusCode::REQUEST_TIMEOUT)),
            Ok(Ok(0)) => return Ok(Head::Closed),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// Parses one request head from the front of `buf` and consumes it; `None` while incomplete.
fn parse(buf: &mut BytesMut) -> Result<Option<Parsed>, StatusCode> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        }
        Err(_) => return Err(StatusCode::BAD_REQUEST),
    };
    let bad = StatusCode::BAD_REQUEST;
    let method = Method::from_bytes(req.method.ok_or(bad)?.as_bytes()).map_err(|_| bad)?;
    let uri = Uri::try_from(req.path.ok_or(bad)?).map_err(|_| bad)?;
    let version = match req.version {
        Some(1) => Version::HTTP_11,
        Some(0) => Version::HTTP_10,
        _ => return Err(StatusCode::HTTP_VERSION_NOT_SUPPORTED),
    };
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    let map = request.headers_mut();
    map.reserve(req.headers.len());
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).map_err(|_| bad)?;
        let value = HeaderValue::from_bytes(h.value).map_err(|_| bad)?;
        map.append(name, value);
    }
    buf.advance(len);

    let mut has_body = map.contains_key(header::TRANSFER_ENCODING);
    for value in map.get_all(header::CONTENT_LENGTH) {
        let n: u64 = value
            .to_str()
            .ok()
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse().ok())
            .ok_or(bad)?;
        has_body |= n > 0;
    }
    let mut close = version == Version::HTTP_10;
    for value in map.get_all(header::CONNECTION) {
        for token in value.to_str().unwrap_or("").split(',') {
            let token = token.trim();
            if token.eq_ignore_ascii_case("close") {
                close = true;
            } else if token.eq_ignore_ascii_case("keep-alive") && version == Version::HTTP_10 {
                close = false;
            }
        }
    }
    Ok(Some(Parsed {
        request,
        keep_alive: !close,
        has_body,
    }))
}

fn plain_error(status: StatusCode) -> Response<Body> {
    let mut resp = Response::new(super::body::full(format!(
        "{}\n",
        status.canonical_reason().unwrap_or("bad request")
    )));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// How the body is delimited on the wire.
enum Framing {
    /// HEAD, 1xx, 204, 304: headers only.
    None,
    File(FileRegion),
    /// A download in progress, sent range by range as it is written; chunked when its size is
    /// not known yet.
    Growing(GrowingReader, Option<u64>),
    Length(u64),
    Chunked,
    /// Unknown length to an HTTP/1.0 client: the end of the connection ends the body.
    UntilClose,
}

/// Writes `resp` to a request of this version and method (HEAD or not); returns whether the
/// connection may carry another request.
async fn write_response(
    stream: &mut TcpStream,
    out: &mut Vec<u8>,
    resp: Response<Body>,
    (version, is_head): (Version, bool),
    mut keep: bool,
    app: &App,
) -> io::Result<bool> {
    let (mut parts, mut body) = resp.into_parts();
    let status = parts.status;
    let headers = &mut parts.headers;
    let bodyless = is_head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if bodyless {
        Framing::None
    } else if let Some(region) = parts.extensions.remove::<FileRegion>() {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(region.len()));
        Framing::File(region)
    } else if let Some(mut reader) = (version == Version::HTTP_10
        && declared_length(headers).is_none())
    .then(|| parts.extensions.remove::<GrowingFile>())
    .flatten()
    .and_then(|g| g.take())
    {
        // An HTTP/1.0 client knows a body is whole only by its length, and the upstream gave
        // none: wait for the verified download, then send it with its length. Ending a
        // close-delimited body early would look like success to such a client.
        let region = reader.verified_region().await?;
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(region.len()));
        Framing::File(region)
    } else if let Some(reader) = parts
        .extensions
        .remove::<GrowingFile>()
        .and_then(|g| g.take())
    {
        match declared_length(headers) {
            Some(n) => Framing::Growing(reader, Some(n)),
            None => {
                headers.insert(
                    header::TRANSFER_ENCODING,
                    HeaderValue::from_static("chunked"),
                );
                Framing::Growing(reader, None)
            }
        }
    } else if let Some(n) = http_body::Body::size_hint(&body).exact() {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        Framing::Length(n)
    } else if let Some(n) = declared_length(headers) {
        Framing::Length(n)
    } else if version == Version::HTTP_10 {
        keep = false;
        Framing::UntilClose
    } else {
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        Framing::Chunked
    };
    if !keep {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    } else if version == Version::HTTP_10 {
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
    }
    if !headers.contains_key(header::DATE) {
        headers.insert(header::DATE, http_date());
    }

    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers.iter() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");

    match framing {
        Framing::None => {
            stalls(stream.write_all(out)).await?;
        }
        Framing::File(region) => {
            stalls(stream.write_all(out)).await?;
            send_file(stream, &region, app, "cache").await?;
        }
        Framing::Growing(mut reader, length) => {
            stalls(stream.write_all(out)).await?;
            out.clear();
            let chunked = length.is_none();
            let mut sent = 0u64;
            loop {
                // Waiting for the download: a client that leaves meanwhile ends the response
                // now, not when the next bytes arrive.
                let piece = tokio::select! {
                    piece = reader.next_piece(MAX_SENDFILE) => piece,
                    () = client_closed(stream) => {
                        return Err(io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            "the client left while its download was waiting",
                        ));
                    }
                };
                let Some(piece) = piece else { break };
                // A failed download ends the connection without a clean end of body.
                let piece = piece?;
                let len = match &piece {
                    Piece::File(region) => region.len(),
                    Piece::Bytes(bytes) => bytes.len() as u64,
                };
                if chunked {
                    stalls(stream.write_all(format!("{len:x}\r\n").as_bytes())).await?;
                }
                match &piece {
                    Piece::File(region) => send_file(stream, region, app, "").await?,
                    Piece::Bytes(bytes) => stalls(stream.write_all(bytes)).await?,
                }
                if chunked {
                    stalls(stream.write_all(b"\r\n")).await?;
                }
                sent += len;
            }
            if chunked {
                stalls(stream.write_all(b"0\r\n\r\n")).await?;
            } else if length != Some(sent) {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "download ended before its announced size",
                ));
            }
        }
        Framing::Length(n) => {
            let written = write_body(stream, out, &mut body, false, Some(n)).await?;
            if written != n {
                // The client was promised `n` bytes; only closing tells it the body is cut.
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("response body was {written} bytes, not the {n} announced"),
                ));
            }
        }
        Framing::Chunked => {
            write_body(stream, out, &mut body, true, None).await?;
        }
        Framing::UntilClose => {
            write_body(stream, out, &mut body, false, None).await?;
        }
    }
    Ok(keep)
}

fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Streams `body` after the head already in `out`. Frames that are ready at once join the head
/// in one write (a manifest leaves in a single `write`); when the body has to wait (a blob that
/// is downloading) what is buffered goes out first, so the client sees headers without delay.
/// A body that fails ends the connection without a clean end, so the client sees the cut.
async fn write_body(
    stream: &mut TcpStream,
    out: &mut Vec<u8>,
    body: &mut Body,
    chunked: bool,
    limit: Option<u64>,
) -> io::Result<u64> {
    let mut written = 0u64;
    loop {
        let frame = match body.frame().now_or_never() {
            Some(frame) => frame,
            None => {
                if !out.is_empty() {
                    stalls(stream.write_all(out)).await?;
                    out.clear();
                }
                body.frame().await
            }
        };
        let data: Bytes = match frame {
            None => break,
            Some(Err(e)) => return Err(e),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_trailers) => continue,
            },
        };
        if data.is_empty() {
            continue;
        }
        written += data.len() as u64;
        if limit.is_some_and(|n| written > n) {
            // More than announced would be read as the start of the next response.
            return Err(io::Error::other("response body longer than announced"));
        }
        if chunked {
            out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
        }
        if out.len() + data.len() <= COALESCE {
            out.extend_from_slice(&data);
        } else {
            stalls(stream.write_all(out)).await?;
            out.clear();
            stalls(stream.write_all(&data)).await?;
        }
        if chunked {
            out.extend_from_slice(b"\r\n");
        }
    }
    if chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    if !out.is_empty() {
        stalls(stream.write_all(out)).await?;
        out.clear();
    }
    Ok(written)
}

/// Sends a byte range of a blob's file with `sendfile(2)`: the kernel moves the pages from the
/// page cache to the socket, and no buffer of ours holds them. Counts the bytes as served from
/// `source` (`cache`), unless the caller counted them already (empty `source`).
async fn send_file(
    stream: &TcpStream,
    region: &FileRegion,
    app: &App,
    source: &str,
) -> io::Result<()> {
    let socket = stream.as_raw_fd();
    let file = region.file.as_raw_fd();
    let served =
        (!source.is_empty()).then(|| app.metrics.served_bytes.with_label_values(&[source]));
    let mut offset = libc::off_t::try_from(region.start)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset out of range"))?;
    let mut left = region.len();
    while left > 0 {
        let count = left.min(MAX_SENDFILE) as usize;
        stalls(stream.writable()).await?;
        let sent = stream.try_io(Interest::WRITABLE, || {
            // SAFETY: `socket` and `file` are descriptors owned by `stream` and `region.file`,
            // both borrowed for the whole call, and `offset` is a live `off_t` the kernel
            // advances by the bytes it sent.
            let n = unsafe { libc::sendfile(socket, file, &mut offset, count) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as u64)
            }
        });
        match sent {
            Ok(0) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "cached blob shorter than its size",
                ));
            }
            Ok(n) => {
                if let Some(served) = &served {
                    served.inc_by(n);
                }
                left -= n.min(left);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Runs one write that must make progress within [`WRITE_STALL`]: a client that stops reading
/// gives its connection (and its file and download) back instead of holding them forever.
async fn stalls<T>(write: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    match tokio::time::timeout(WRITE_STALL, write).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client read nothing for too long",
        )),
    }
}

/// Resolves when the client has closed its side (or the connection broke). Bytes it sent ahead
/// (a pipelined request) are left for the next read, and watching stops.
async fn client_closed(stream: &TcpStream) {
    let mut probe = [0u8; 1];
    match stream.peek(&mut probe).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

/// Makes the next close of `stream` a reset (`SO_LINGER` 0), which no client takes for the
/// clean end of a body.
fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `stream` owns a valid socket descriptor for the duration of the call, and the
    // option value points to a live `linger` of the size passed.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

thread_local! {
    static DATE: RefCell<(u64, HeaderValue)> =
        const { RefCell::new((0, HeaderValue::from_static(""))) };
}

/// The `Date` header, formatted once per second per thread.
fn http_date() -> HeaderValue {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs || cached.1.is_empty() {
            let value = HeaderValue::from_str(&httpdate::fmt_http_date(now))
                .unwrap_or_else(|_| HeaderValue::from_static(""));
            *cached = (secs, value);
        }
        cached.1.clone()
    })
}

/// Hands a connection that opened with the HTTP/2 preface to hyper, bytes already read included.
async fn serve_h2(
    stream: TcpStream,
    read: BytesMut,
    peer: SocketAddr,
    app: Arc<App>,
    stop: CancellationToken,
) -> io::Result<()> {
    let io = TokioIo::new(Prefixed {
        prefix: read.freeze(),
        inner: stream,
    });
    let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        let app = app.clone();
        req.extensions_mut().insert(ConnInfo {
            remote: peer,
            client_subject: None,
        });
        async move { Ok::<_, std::convert::Infallible>(super::handle(app, req).await) }
    });
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(H2_PING_INTERVAL))
        .keep_alive_timeout(H2_PING_TIMEOUT)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    result.map_err(io::Error::other)
}

/// A stream that first yields bytes already read from it.
struct Prefixed {
    prefix: Bytes,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Option<Parsed>, StatusCode> {
        let mut buf = BytesMut::from(s);
        parse(&mut buf)
    }

    #[test]
    fn parses_a_request_and_keeps_what_follows() {
        let mut buf = BytesMut::from(
            "GET /v2/ HTTP/1.1\r\nHost: x\r\nAccept: a\r\nAccept: b\r\n\r\nGET /next",
        );
        let parsed = parse(&mut buf).expect("valid").expect("complete");
        assert_eq!(parsed.request.method(), Method::GET);
        assert_eq!(parsed.request.uri().path(), "/v2/");
        assert_eq!(parsed.request.headers().get_all("accept").iter().count(), 2);
        assert!(parsed.keep_alive);
        assert!(!parsed.has_body);
        assert_eq!(&buf[..], b"GET /next");
    }

    #[test]
    fn incomplete_heads_wait_for_more() {
        assert!(matches!(parse_str("GET /v2/ HTTP/1.1\r\nHost:"), Ok(None)));
    }

    #[test]
    fn connection_semantics_follow_the_version() {
        let p = parse_str("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!p.keep_alive);
        let p = parse_str("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(p.keep_alive);
        let p = parse_str("GET / HTTP/1.1\r\nConnection: Close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!p.keep_alive);
    }

    #[test]
    fn announced_bodies_are_noticed() {
        let p = parse_str("PUT /v2/a/blobs/uploads/ HTTP/1.1\r\nContent-Length: 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(p.has_body);
        let p = parse_str("POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(p.has_body);
        let p = parse_str("GET /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!p.has_body);
    }

    #[test]
    fn malformed_heads_are_refused() {
        for bad in [
            "GET /v2/ HTTP/1.1\r\nBad Header: x\r\n\r\n",
            "GET /v2/ HTTP/1.1\r\nContent-Length: many\r\n\r\n",
            "\x01\x02 / HTTP/1.1\r\n\r\n",
        ] {
            assert_eq!(
                parse_str(bad).err(),
                Some(StatusCode::BAD_REQUEST),
                "{bad:?}"
            );
        }
        let many: String = (0..200).map(|i| format!("x-{i}: y\r\n")).collect();
        let req = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(
            parse_str(&req).err(),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
    }
}
