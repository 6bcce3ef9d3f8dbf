//! Progress of a seed, export or import: bars (objects and bytes) on a terminal, one plain line
//! per object otherwise (CI logs, `| tee`), nothing in tests.

use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::oci::Digest;

/// What the workflows report as they go. Objects are manifests and blobs; bytes are their sizes.
pub trait Progress: Send + Sync {
    /// More work became known (an image was resolved).
    fn add_work(&self, objects: u64, bytes: u64);
    /// `bytes` more bytes were transferred or found present.
    fn advance(&self, bytes: u64);
    /// One object is done: `fetched` when it was transferred, false when already present.
    fn object_done(&self, image: &str, kind: &str, digest: &Digest, size: u64, fetched: bool);
    /// A line for the operator (an image finished or failed).
    fn note(&self, line: &str);
    fn finish(&self);
}

/// Reports nothing.
pub struct Silent;

impl Progress for Silent {
    fn add_work(&self, _: u64, _: u64) {}
    fn advance(&self, _: u64) {}
    fn object_done(&self, _: &str, _: &str, _: &Digest, _: u64, _: bool) {}
    fn note(&self, _: &str) {}
    fn finish(&self) {}
}

/// Plain lines on stderr, for logs.
#[derive(Default)]
pub struct Lines {
    objects: AtomicU64,
    done: AtomicU64,
    out: Mutex<()>,
}

impl Lines {
    fn line(&self, text: &str) {
        let _guard = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(std::io::stderr(), "{text}");
    }
}

impl Progress for Lines {
    fn add_work(&self, objects: u64, _: u64) {
        self.objects.fetch_add(objects, Ordering::Relaxed);
    }

    fn advance(&self, _: u64) {}

    fn object_done(&self, image: &str, kind: &str, digest: &Digest, size: u64, fetched: bool) {
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        let total = self.objects.load(Ordering::Relaxed);
        let how = if fetched { "done" } else { "present" };
        self.line(&format!(
            "[{done}/{total}] {image}: {kind} {digest} ({}) {how}",
            bytesize::ByteSize::b(size)
        ));
    }

    fn note(&self, line: &str) {
        self.line(line);
    }

    fn finish(&self) {}
}

/// Two bars on a terminal: objects, and bytes with rate and time left.
pub struct Bars {
    multi: MultiProgress,
    objects: ProgressBar,
    bytes: ProgressBar,
}

impl Default for Bars {
    fn default() -> Bars {
        let multi = MultiProgress::new();
        let objects = multi.add(ProgressBar::new(0));
        objects.set_style(
            ProgressStyle::with_template("{prefix:>8} [{bar:40}] {pos}/{len} {wide_msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        objects.set_prefix("objects");
        let bytes = multi.add(ProgressBar::new(0));
        bytes.set_style(
            ProgressStyle::with_template(
                "{prefix:>8} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bytes.set_prefix("bytes");
        Bars {
            multi,
            objects,
            bytes,
        }
    }
}

impl Progress for Bars {
    fn add_work(&self, objects: u64, bytes: u64) {
        self.objects.inc_length(objects);
        self.bytes.inc_length(bytes);
    }

    fn advance(&self, bytes: u64) {
        self.bytes.inc(bytes);
    }

    fn object_done(&self, image: &str, kind: &str, _: &Digest, _: u64, _: bool) {
        self.objects.inc(1);
        self.objects.set_message(format!("{image}: {kind}"));
    }

    fn note(&self, line: &str) {
        let _ = self.multi.println(line);
    }

    fn finish(&self) {
        self.objects.finish_with_message("");
        self.bytes.finish();
    }
}
