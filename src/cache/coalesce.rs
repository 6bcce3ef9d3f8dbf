//! One upstream download per digest, however many clients ask. The first miss starts a fill
//! task that streams the upstream body into an `Ingest`; every client, the first included,
//! reads the growing file from disk, so a slow client never throttles the fill and a client
//! that leaves does not stop it (the fill runs on up to `fill_timeout` with nobody reading).
//!
//! Invariant: a reader never delivers the last byte of a blob of known size (or, for an
//! unknown size, never ends the body) before the fill has verified the digest. A mismatch or a
//! broken upstream ends every reader's body with an error, so no client ever takes a wrong blob
//! for a complete one.
//!
//! A full disk is not a failed download: when a write fails with ENOSPC, nothing of the blob is
//! kept (the temporary file is removed) and every reader carries on straight from the upstream
//! (`FillState::DiskFull`): it hashes what it already sent from the partial file, asks the
//! upstream for the rest with a `Range` request, and still holds back its last chunk until the
//! digest checks out.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::time::{Duration, Instant};

use super::Error;
use crate::metrics::Metrics;
use crate::oci::{Digest, RepoName};
use crate::store::{Ingest, Store, Verified};
use crate::upstream::Upstream;

/// Largest read handed to a client at once.
pub const READ_CHUNK: usize = 256 * 1024;
/// Bytes received from the upstream while the previous write is still on its way to disk;
/// past this the upstream waits (TCP backpressure), so memory stays bounded.
const MAX_PENDING: usize = 4 * 1024 * 1024;

#[derive(Clone)]
pub enum FillState {
    /// Waiting for the upstream's response headers.
    Starting,
    /// Bytes `0..written` are on disk; `size` is the upstream's Content-Length.
    Filling {
        size: Option<u64>,
        written: u64,
    },
    /// Verified and in the store.
    Done {
        size: u64,
    },
    Failed(Arc<Error>),
    /// The disk filled up after `0..written` bytes: nothing is kept, readers fetch the rest
    /// from the upstream themselves.
    DiskFull {
        size: Option<u64>,
    },
}

pub struct Flight {
    pub upstream: Arc<Upstream>,
    pub repo: RepoName,
    digest: Digest,
    state: watch::Receiver<FillState>,
    /// `None` only when the disk was too full to even create the download's file.
    file: Option<Arc<File>>,
    readers: AtomicUsize,
}

impl Flight {
    /// Waits for the upstream's headers; the size when the upstream sent one.
    pub async fn size(&self) -> Result<Option<u64>, Arc<Error>> {
        let mut rx = self.state.clone();
        loop {
            match &*rx.borrow_and_update() {
                FillState::Starting => {}
                FillState::Filling { size, .. } => return Ok(*size),
                FillState::Done { size } => return Ok(Some(*size)),
                FillState::DiskFull { size } => return Ok(*size),
                FillState::Failed(e) => return Err(e.clone()),
            }
            if rx.changed().await.is_err() {
                return Err(Arc::new(Error::FillAbandoned));
            }
        }
    }

    /// The file, once its digest has been verified (it may still be on its way into the
    /// store): such a blob is served like a stored one, ranges included.
    pub fn verified_file(&self) -> Option<crate::store::BlobFile> {
        match &*self.state.borrow() {
            FillState::Done { size } => Some(crate::store::BlobFile {
                file: self.file.clone()?,
                size: *size,
            }),
            _ => None,
        }
    }

    /// A reader of the blob from the first byte, as it downloads.
    pub fn reader(self: &Arc<Self>, metrics: Arc<Metrics>) -> GrowingReader {
        self.readers.fetch_add(1, Ordering::Relaxed);
        GrowingReader {
            flight: self.clone(),
            state: self.state.clone(),
            pos: 0,
            metrics,
            relay: None,
        }
    }
}

/// The in-flight fills, by digest.
#[derive(Default)]
pub struct Flights {
    map: Mutex<HashMap<Digest, Arc<Flight>>>,
}

pub struct FillParams {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub fill_timeout: Duration,
    pub attempts: u32,
}

impl Flights {
    pub fn is_empty(&self) -> bool {
        self.map
            .lock()
            .expect("flight map lock is never poisoned")
            .is_empty()
    }

    pub fn get(&self, digest: &Digest) -> Option<Arc<Flight>> {
        self.map
            .lock()
            .expect("flight map lock is never poisoned")
            .get(digest)
            .cloned()
    }

    /// Joins the fill of `digest` if one runs, else starts one fetching from `upstream`'s
    /// `repo`. The bool says whether this call started it.
    pub fn join_or_start(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
        params: &FillParams,
    ) -> Result<(Arc<Flight>, bool), Error> {
        let mut map = self.map.lock().expect("flight map lock is never poisoned");
        if let Some(flight) = map.get(digest) {
            return Ok((flight.clone(), false));
        }
        let ingest = match params.store.begin_ingest(digest) {
            Ok(ingest) => ingest,
            Err(e) if e.is_disk_full() => {
                // Not even an empty file fits: the client relays from the upstream on its own.
                drop(map);
                params.metrics.disk_full.inc();
                tracing::warn!(%digest, error = %e, "the cache's disk is full: this blob goes to its client straight from the upstream and is not kept");
                let (_, rx) = watch::channel(FillState::DiskFull { size: None });
                let flight = Arc::new(Flight {
                    upstream: upstream.clone(),
                    repo: repo.clone(),
                    digest: digest.clone(),
                    state: rx,
                    file: None,
                    readers: AtomicUsize::new(0),
                });
                return Ok((flight, true));
            }
            Err(e) => return Err(e.into()),
        };
        let (tx, rx) = watch::channel(FillState::Starting);
        let flight = Arc::new(Flight {
            upstream: upstream.clone(),
            repo: repo.clone(),
            digest: digest.clone(),
            state: rx,
            file: Some(ingest.reader()),
            readers: AtomicUsize::new(0),
        });
        map.insert(digest.clone(), flight.clone());
        drop(map);
        let task = Fill {
            flights: self.clone(),
            flight: flight.clone(),
            digest: digest.clone(),
            tx,
            store: params.store.clone(),
            metrics: params.metrics.clone(),
            fill_timeout: params.fill_timeout,
            attempts: params.attempts,
        };
        tokio::spawn(task.run(ingest));
        Ok((flight, true))
    }
}

struct Fill {
    flights: Arc<Flights>,
    flight: Arc<Flight>,
    digest: Digest,
    tx: watch::Sender<FillState>,
    store: Store,
    metrics: Arc<Metrics>,
    fill_timeout: Duration,
    attempts: u32,
}

impl Fill {
    async fn run(self, ingest: Ingest) {
        self.metrics.fetches_in_flight.inc();
        let span = tracing::info_span!("fill", upstream = %self.flight.upstream.name(), repo = %self.flight.repo, digest = %self.digest);
        let result = tracing::Instrument::instrument(self.download(ingest), span.clone()).await;
        self.metrics.fetches_in_flight.dec();
        let _enter = span.enter();
        match result {
            Ok((verified, size)) => {
                // The digest matched: readers may take the last byte now, while the file is
                // synced and renamed into the store (a crash then costs a refetch, never a
                // wrong byte).
                self.tx.send_replace(FillState::Done { size });
                match verified.persist().await {
                    Ok(()) => {
                        if let Err(e) = self
                            .store
                            .link(self.flight.upstream.name(), &self.flight.repo, &self.digest)
                            .await
                        {
                            tracing::error!(error = %e, "could not record the repository link of a stored blob");
                        }
                        tracing::info!(size, "blob stored");
                    }
                    Err(e) => tracing::error!(error = %e, "a verified blob could not be stored"),
                }
                self.leave();
            }
            Err(Error::Store(e)) if e.is_disk_full() => {
                self.leave();
                self.metrics.disk_full.inc();
                let size = match &*self.tx.borrow() {
                    FillState::Filling { size, .. } => *size,
                    _ => None,
                };
                tracing::warn!(error = %e, "the cache's disk is full: this blob goes to its clients straight from the upstream and is not kept");
                self.tx.send_replace(FillState::DiskFull { size });
            }
            Err(e) => {
                // Leave before announcing the failure, so a retry starts a new download
                // instead of joining this one.
                self.leave();
                if matches!(
                    e,
                    Error::Store(
                        crate::store::Error::DigestMismatch { .. }
                            | crate::store::Error::SizeMismatch { .. }
                    )
                ) {
                    self.metrics
                        .digest_mismatches
                        .with_label_values(&[self.flight.upstream.name().as_str()])
                        .inc();
                    tracing::warn!(error = %e, "upstream sent a blob that does not match its digest; not stored");
                } else {
                    tracing::warn!(error = %e, "blob download failed; nothing stored");
                }
                self.tx.send_replace(FillState::Failed(Arc::new(e)));
            }
        }
    }

    /// From now on, requests find the blob in the store (or start a new download).
    fn leave(&self) {
        self.flights
            .map
            .lock()
            .expect("flight map lock is never poisoned")
            .remove(&self.digest);
    }

    async fn download(&self, ingest: Ingest) -> Result<(Verified, u64), Error> {
        let upstream = &self.flight.upstream;
        let mut resp = upstream
            .blob(&self.flight.repo, &self.digest, 0)
            .await
            .map_err(Error::from_blob_upstream)?;
        let size = resp.content_length();
        self.tx
            .send_replace(FillState::Filling { size, written: 0 });
        let mut resumes = 0;
        let mut abandoned_since: Option<Instant> = None;
        let mut slot = Some(ingest);
        loop {
            let result = self
                .stream_into(resp, &mut slot, &mut abandoned_since)
                .await;
            let written = slot.as_ref().map_or(0, Ingest::written);
            match result {
                Ok(()) => break,
                Err(Error::Upstream(e))
                    if slot.is_some()
                        && resumes + 1 < self.attempts
                        && size.is_none_or(|s| written < s) =>
                {
                    resumes += 1;
                    tracing::warn!(error = %e, written, "upstream body broke off; resuming with a range request");
                    resp = upstream
                        .blob(&self.flight.repo, &self.digest, written)
                        .await
                        .map_err(Error::from_blob_upstream)?;
                }
                Err(e) => return Err(e),
            }
        }
        let ingest = slot.ok_or(Error::FillAbandoned)?;
        let written = ingest.written();
        Ok((ingest.verify(size).await?, written))
    }

    /// Copies one upstream response into the ingest file. One write runs on a blocking thread
    /// (its hashing on the download's hashing thread) while the next chunks arrive; they are
    /// batched into the following write.
    /// A fast upstream thus gets large writes overlapping the network, and a slow one gets each
    /// chunk to readers at once. `slot` holds the ingest whenever no write is running; after an
    /// error it holds it again (for a resume) unless the write itself failed.
    async fn stream_into(
        &self,
        resp: reqwest::Response,
        slot: &mut Option<Ingest>,
        abandoned_since: &mut Option<Instant>,
    ) -> Result<(), Error> {
        let size = match &*self.tx.borrow() {
            FillState::Filling { size, .. } => *size,
            _ => None,
        };
        let mut body = resp.bytes_stream();
        let mut pending: Vec<Bytes> = Vec::new();
        let mut pending_len = 0;
        let mut writing: Option<tokio::task::JoinHandle<(Ingest, crate::store::Result<u64>)>> =
            None;
        let mut ended = false;
        let mut failure = None;
        loop {
            if writing.is_none() && !pending.is_empty() {
                let Some(mut ingest) = slot.take() else {
                    return Err(Error::FillAbandoned);
                };
                let batch = std::mem::take(&mut pending);
                pending_len = 0;
                writing = Some(tokio::spawn(async move {
                    let result = ingest.append(batch).await;
                    (ingest, result)
                }));
            }
            if writing.is_none() && (ended || failure.is_some()) {
                break;
            }
            let can_read = !ended && failure.is_none() && pending_len < MAX_PENDING;
            tokio::select! {
                done = async { (&mut *writing.as_mut().expect("guarded by the branch condition")).await }, if writing.is_some() => {
                    writing = None;
                    let (ingest, result) = done.map_err(crate::store::Error::Task)?;
                    *slot = Some(ingest);
                    let written = result?;
                    self.tx.send_replace(FillState::Filling { size, written });
                    if self.flight.readers.load(Ordering::Relaxed) == 0 {
                        let since = *abandoned_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > self.fill_timeout {
                            return Err(Error::FillAbandoned);
                        }
                    } else {
                        *abandoned_since = None;
                    }
                }
                chunk = body.next(), if can_read => match chunk {
                    Some(Ok(chunk)) => {
                        pending_len += chunk.len();
                        pending.push(chunk);
                    }
                    // What arrived before a failure is valid: it is written, and a resume
                    // starts after it.
                    Some(Err(e)) => failure = Some(e),
                    None => ended = true,
                },
            }
        }
        match failure {
            Some(e) => Err(Error::Upstream(self.flight.upstream.body_error(e))),
            None => Ok(()),
        }
    }
}

/// Reads a blob as it downloads: positional reads of the ingest file up to what is written,
/// holding back the final byte until the digest is verified.
pub struct GrowingReader {
    flight: Arc<Flight>,
    state: watch::Receiver<FillState>,
    pos: u64,
    metrics: Arc<Metrics>,
    /// Set once the disk filled up: the rest of the blob, straight from the upstream.
    relay: Option<Box<Relay>>,
}

struct Relay {
    body: futures_util::stream::BoxStream<'static, reqwest::Result<Bytes>>,
    hasher: crate::oci::DigestHasher,
    /// The latest chunk, sent only once the next one (or the verified end) arrives.
    held: Option<Bytes>,
    /// Bytes hashed so far, from the start of the blob.
    hashed: u64,
    ended: bool,
    /// Why the body failed; every later read fails the same way, so it never looks complete.
    broken: Option<&'static str>,
}

impl Drop for GrowingReader {
    fn drop(&mut self) {
        self.flight.readers.fetch_sub(1, Ordering::Relaxed);
    }
}

impl GrowingReader {
    /// Waits, without reading, until the download is verified, reporting the bytes written so
    /// far as they grow; the verified size. Holding the reader keeps the fill from being
    /// abandoned, however long it takes.
    pub async fn wait_verified(&mut self, mut progress: impl FnMut(u64)) -> Result<u64, Error> {
        loop {
            match &*self.state.borrow_and_update() {
                FillState::Starting => {}
                FillState::Filling { written, .. } => progress(*written),
                FillState::Done { size } => {
                    progress(*size);
                    return Ok(*size);
                }
                FillState::Failed(e) => return Err(Error::Fill(e.clone())),
                // Nothing can be kept while the disk is full: what waits for the stored blob
                // (seeding) fails instead of relaying it.
                FillState::DiskFull { .. } => {
                    return Err(Error::Store(crate::store::Error::Io {
                        op: "store (the cache's disk is full)",
                        path: self.flight.digest.to_string().into(),
                        source: std::io::Error::from(std::io::ErrorKind::StorageFull),
                    }));
                }
            }
            if self.state.changed().await.is_err() {
                return Err(Error::FillAbandoned);
            }
        }
    }

    /// Waits until the whole download is verified and returns its file: for a client that must
    /// be given a length up front (HTTP/1.0) when the upstream announced none.
    pub async fn verified_region(&mut self) -> std::io::Result<Region> {
        let size = self
            .wait_verified(|_| {})
            .await
            .map_err(std::io::Error::other)?;
        let file = self
            .flight
            .file
            .clone()
            .ok_or_else(|| std::io::Error::other("the download has no file"))?;
        self.pos = size;
        Ok(Region {
            file,
            start: 0,
            end: size,
        })
    }

    /// The next chunk, `None` at the verified end, or an error if the fill failed.
    pub async fn next_chunk(&mut self) -> Option<std::io::Result<Bytes>> {
        let region = match self.next_piece(READ_CHUNK as u64).await? {
            Ok(Piece::File(region)) => region,
            Ok(Piece::Bytes(bytes)) => return Some(Ok(bytes)),
            Err(e) => return Some(Err(e)),
        };
        let len = region.len();
        let result = read_at(region.file, region.start, len as usize).await;
        if let Ok(bytes) = &result
            && (bytes.len() as u64) < len
        {
            return Some(Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "download shorter than written",
            )));
        }
        Some(result)
    }

    /// What may be handed out next: a range of the download's file (at most `max` bytes), or,
    /// once the disk filled up, bytes relayed from the upstream. `None` at the verified end, an
    /// error if the fill failed. It counts as served: the caller sends it whole or ends the
    /// client's connection.
    pub async fn next_piece(&mut self, max: u64) -> Option<std::io::Result<Piece>> {
        loop {
            let (readable, done_size) = match &*self.state.borrow_and_update() {
                FillState::Starting => (0, None),
                FillState::Filling { size, written } => {
                    let held_back = size.map_or(*written, |s| (*written).min(s.saturating_sub(1)));
                    (held_back, None)
                }
                FillState::Done { size } => (*size, Some(*size)),
                FillState::Failed(e) => return Some(Err(std::io::Error::other(e.to_string()))),
                // Checked below, once the borrow of the state is released.
                FillState::DiskFull { .. } => (0, None),
            };
            let disk_full = match &*self.state.borrow() {
                FillState::DiskFull { size } => Some(*size),
                _ => None,
            };
            if let Some(size) = disk_full {
                return self.relay_next(size).await.map(|r| r.map(Piece::Bytes));
            }
            if self.pos < readable {
                let Some(file) = self.flight.file.clone() else {
                    return Some(Err(std::io::Error::other("the download has no file")));
                };
                let start = self.pos;
                let end = readable.min(start.saturating_add(max.max(1)));
                self.pos = end;
                self.metrics
                    .served_bytes
                    .with_label_values(&["upstream"])
                    .inc_by(end - start);
                return Some(Ok(Piece::File(Region { file, start, end })));
            }
            if done_size.is_some() {
                return None;
            }
            if self.state.changed().await.is_err() {
                return Some(Err(std::io::Error::other("the download stopped")));
            }
        }
    }
}

/// The next part of a download for a client.
pub enum Piece {
    /// Already written to the download's file.
    File(Region),
    /// Relayed from the upstream because the disk is full.
    Bytes(Bytes),
}

/// Bytes `start..end` of a blob's file (stored, or downloading and already written).
#[derive(Clone)]
pub struct Region {
    pub file: Arc<File>,
    pub start: u64,
    pub end: u64,
}

impl Region {
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl GrowingReader {
    /// The next chunk once the disk filled up: what was not yet sent comes from the upstream,
    /// and the whole blob is still checked against its digest before its last chunk goes out.
    async fn relay_next(&mut self, size: Option<u64>) -> Option<std::io::Result<Bytes>> {
        if self.relay.is_none() {
            match start_relay(self.flight.clone(), self.pos).await {
                Ok(relay) => self.relay = Some(Box::new(relay)),
                Err(e) => return Some(Err(e)),
            }
        }
        let relay = self.relay.as_mut().expect("set just above");
        if let Some(reason) = relay.broken {
            return Some(Err(std::io::Error::other(reason)));
        }
        while !relay.ended {
            match relay.body.next().await {
                Some(Ok(chunk)) if chunk.is_empty() => {}
                Some(Ok(chunk)) => {
                    relay.hasher.update(&chunk);
                    relay.hashed += chunk.len() as u64;
                    if size.is_some_and(|s| relay.hashed > s) {
                        // Longer than announced: nothing more goes out, and the body fails.
                        relay.ended = true;
                        relay.held = None;
                        let reason = "the upstream sent more than the blob's size";
                        relay.broken = Some(reason);
                        return Some(Err(std::io::Error::other(reason)));
                    }
                    if let Some(previous) = relay.held.replace(chunk) {
                        return Some(Ok(self.sent(previous)));
                    }
                }
                Some(Err(e)) => {
                    relay.ended = true;
                    relay.held = None;
                    relay.broken = Some("the upstream body broke off");
                    return Some(Err(std::io::Error::other(format!(
                        "the upstream body broke off: {e}"
                    ))));
                }
                None => {
                    relay.ended = true;
                    let hasher = std::mem::replace(
                        &mut relay.hasher,
                        crate::oci::DigestHasher::new(self.flight.digest.algorithm()),
                    );
                    let actual = hasher.finish();
                    if actual != self.flight.digest || size.is_some_and(|s| s != relay.hashed) {
                        relay.held = None;
                        let reason = "the upstream sent a blob that does not match its digest";
                        relay.broken = Some(reason);
                        self.metrics
                            .digest_mismatches
                            .with_label_values(&[self.flight.upstream.name().as_str()])
                            .inc();
                        return Some(Err(std::io::Error::other(reason)));
                    }
                }
            }
        }
        let last = relay.held.take()?;
        Some(Ok(self.sent(last)))
    }

    fn sent(&mut self, chunk: Bytes) -> Bytes {
        self.pos += chunk.len() as u64;
        self.metrics
            .served_bytes
            .with_label_values(&["upstream"])
            .inc_by(chunk.len() as u64);
        chunk
    }
}

/// Hashes the bytes already sent (still readable through the unlinked partial file) and
/// asks the upstream for the rest.
async fn start_relay(flight: Arc<Flight>, pos: u64) -> std::io::Result<Relay> {
    let mut hasher = crate::oci::DigestHasher::new(flight.digest.algorithm());
    let mut offset = 0;
    while offset < pos {
        let len = (pos - offset).min(4 * READ_CHUNK as u64) as usize;
        let file = flight
            .file
            .clone()
            .ok_or_else(|| std::io::Error::other("the partial download has no file"))?;
        let bytes = read_at(file, offset, len).await?;
        if bytes.is_empty() {
            return Err(std::io::Error::other("the partial download was cut short"));
        }
        hasher.update(&bytes);
        offset += bytes.len() as u64;
    }
    let resp = flight
        .upstream
        .blob(&flight.repo, &flight.digest, pos)
        .await
        .map_err(std::io::Error::other)?;
    Ok(Relay {
        body: resp.bytes_stream().boxed(),
        hasher,
        held: None,
        hashed: pos,
        ended: false,
        broken: None,
    })
}

/// Reads `len` bytes at `offset` on a blocking thread (a short read only at end of file).
pub async fn read_at(file: Arc<File>, offset: u64, len: usize) -> std::io::Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        let mut buf = BytesMut::zeroed(len);
        let mut filled = 0;
        while filled < len {
            let n = file.read_at(&mut buf[filled..], offset + filled as u64)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        buf.truncate(filled);
        Ok(buf.freeze())
    })
    .await
    .map_err(std::io::Error::other)?
}
