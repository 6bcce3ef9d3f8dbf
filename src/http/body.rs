//! Response bodies: small documents in memory, and blobs streamed from a file range or from a
//! download in progress. A blob is never collected in memory.

use std::fs::File;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::Frame;

use crate::cache::coalesce::{GrowingReader, READ_CHUNK, Region, read_at};
use crate::metrics::Metrics;

pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

/// Bytes `start..end` of a stored, verified blob, attached to a response's extensions beside its
/// streaming body. The plain HTTP/1.1 loop (`http1`) sends it with `sendfile(2)` and never polls
/// the body; hyper (TLS, HTTP/2) ignores it and streams the body.
pub type FileRegion = Region;

/// A download in progress, attached to a response's extensions beside its streaming body; both
/// share one reader, and whichever takes it first serves the client (`http1` with `sendfile` of
/// each newly written range, hyper by polling the body).
#[derive(Clone)]
pub struct GrowingFile(Arc<Mutex<Option<GrowingReader>>>);

impl GrowingFile {
    pub fn take(&self) -> Option<GrowingReader> {
        self.0.lock().ok()?.take()
    }
}

/// Bytes `start..end` of a stored blob.
pub fn file_range(file: Arc<File>, start: u64, end: u64, metrics: Arc<Metrics>) -> Body {
    let stream = futures_util::stream::unfold(start, move |pos| {
        let file = file.clone();
        let metrics = metrics.clone();
        async move {
            if pos >= end {
                return None;
            }
            let len = (end - pos).min(READ_CHUNK as u64) as usize;
            match read_at(file, pos, len).await {
                Ok(bytes) if bytes.is_empty() => Some((
                    Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "cached blob shorter than its size",
                    )),
                    end,
                )),
                Ok(bytes) => {
                    metrics
                        .served_bytes
                        .with_label_values(&["cache"])
                        .inc_by(bytes.len() as u64);
                    let next = pos + bytes.len() as u64;
                    Some((Ok(Frame::data(bytes)), next))
                }
                Err(e) => Some((Err(e), end)),
            }
        }
    });
    StreamBody::new(stream).boxed_unsync()
}

/// A blob as it downloads, and the handle that lets `http1` send it by `sendfile` instead; the
/// body ends with an error (never a clean end) if the download fails.
pub fn growing(reader: GrowingReader) -> (Body, GrowingFile) {
    let slot = GrowingFile(Arc::new(Mutex::new(Some(reader))));
    let taker = slot.clone();
    let stream = futures_util::stream::unfold(None, move |reader: Option<GrowingReader>| {
        let taker = taker.clone();
        async move {
            let mut reader = match reader {
                Some(r) => r,
                None => taker.take()?,
            };
            match reader.next_chunk().await? {
                Ok(bytes) => Some((Ok(Frame::data(bytes)), Some(reader))),
                Err(e) => Some((Err(e), None)),
            }
        }
    });
    (StreamBody::new(stream).boxed_unsync(), slot)
}
