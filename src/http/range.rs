//! The single byte range of a `Range` header, for cached blobs (RFC 9110 §14). Anything we do
//! not serve as one range (several ranges, other units, garbage) is ignored, as the RFC allows,
//! and the whole blob is sent.

/// What to send for a `Range` header on a blob of `size` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Range {
    /// Send everything (200).
    Full,
    /// Send `start..=end` (206).
    Part { start: u64, end: u64 },
    /// 416 with `Content-Range: bytes */size`.
    Unsatisfiable,
}

pub fn parse(header: Option<&str>, size: u64) -> Range {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Range::Full;
    };
    if spec.contains(',') {
        return Range::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Range::Full;
    };
    let num = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (first.trim(), last.trim()) {
        ("", suffix) => match num(suffix) {
            Some(0) => Range::Unsatisfiable,
            Some(n) if size > 0 => Range::Part {
                start: size.saturating_sub(n),
                end: size - 1,
            },
            Some(_) => Range::Unsatisfiable,
            None => Range::Full,
        },
        (start, end) => {
            let Some(start) = num(start) else {
                return Range::Full;
            };
            let end = if end.is_empty() {
                size.saturating_sub(1)
            } else {
                match num(end) {
                    Some(e) if e >= start => e.min(size.saturating_sub(1)),
                    _ => return Range::Full,
                }
            };
            if start >= size {
                Range::Unsatisfiable
            } else {
                Range::Part { start, end }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn single_ranges() {
        assert_eq!(
            parse(Some("bytes=0-9"), 100),
            Range::Part { start: 0, end: 9 }
        );
        assert_eq!(
            parse(Some("bytes=90-"), 100),
            Range::Part { start: 90, end: 99 }
        );
        assert_eq!(
            parse(Some("bytes=-10"), 100),
            Range::Part { start: 90, end: 99 }
        );
        assert_eq!(
            parse(Some("bytes=50-500"), 100),
            Range::Part { start: 50, end: 99 }
        );
        assert_eq!(parse(Some("bytes=100-"), 100), Range::Unsatisfiable);
        assert_eq!(parse(Some("bytes=-0"), 100), Range::Unsatisfiable);
    }

    #[test]
    fn what_is_ignored() {
        assert_eq!(parse(None, 100), Range::Full);
        assert_eq!(parse(Some("bytes=0-1,5-6"), 100), Range::Full);
        assert_eq!(parse(Some("items=0-1"), 100), Range::Full);
        assert_eq!(parse(Some("bytes=9-1"), 100), Range::Full);
        assert_eq!(parse(Some("bytes=x-1"), 100), Range::Full);
    }

    proptest! {
        #[test]
        fn parts_stay_inside_the_blob(h in "\\PC*", size in 0u64..1000) {
            if let Range::Part { start, end } = parse(Some(&h), size) {
                prop_assert!(start <= end && end < size);
            }
        }
    }
}
