//! `Range: bytes=…` for blob GETs (RFC 9110 §14): one range, as clients resume layers.

/// An inclusive byte range within a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum RangeError {
    /// Not a range we understand (the header is then answered with 416 too: clients that send
    /// Range to a registry expect it honoured, not silently ignored).
    Malformed,
    Unsatisfiable,
}

impl ByteRange {
    /// Parses `bytes=a-b`, `bytes=a-` or `bytes=-n` against a blob of `size` bytes.
    pub fn parse(header: &str, size: u64) -> Result<ByteRange, RangeError> {
        let spec = header
            .trim()
            .strip_prefix("bytes=")
            .ok_or(RangeError::Malformed)?
            .trim();
        if spec.contains(',') {
            return Err(RangeError::Malformed);
        }
        let (a, b) = spec.split_once('-').ok_or(RangeError::Malformed)?;
        let num = |s: &str| -> Result<u64, RangeError> {
            if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
                return Err(RangeError::Malformed);
            }
            s.parse().map_err(|_| RangeError::Malformed)
        };
        let (start, end) = match (a.trim(), b.trim()) {
            ("", n) => {
                let n = num(n)?;
                if n == 0 || size == 0 {
                    return Err(RangeError::Unsatisfiable);
                }
                (size.saturating_sub(n), size - 1)
            }
            (s, "") => (num(s)?, size.saturating_sub(1)),
            (s, e) => {
                let (s, e) = (num(s)?, num(e)?);
                if e < s {
                    return Err(RangeError::Malformed);
                }
                (s, e.min(size.saturating_sub(1)))
            }
        };
        if start >= size {
            return Err(RangeError::Unsatisfiable);
        }
        Ok(ByteRange { start, end })
    }

    pub fn content_range(&self, size: u64) -> String {
        format!("bytes {}-{}/{size}", self.start, self.end)
    }

    /// Bytes in the range; never zero.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u64 {
        self.end + 1 - self.start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        let r = |h: &str| ByteRange::parse(h, 1000);
        assert_eq!(r("bytes=0-99"), Ok(ByteRange { start: 0, end: 99 }));
        assert_eq!(
            r("bytes=500-"),
            Ok(ByteRange {
                start: 500,
                end: 999
            })
        );
        assert_eq!(
            r("bytes=-100"),
            Ok(ByteRange {
                start: 900,
                end: 999
            })
        );
        assert_eq!(r("bytes=-5000"), Ok(ByteRange { start: 0, end: 999 }));
        assert_eq!(
            r("bytes=990-5000"),
            Ok(ByteRange {
                start: 990,
                end: 999
            })
        );
        assert_eq!(
            r("bytes=0-99").unwrap().content_range(1000),
            "bytes 0-99/1000"
        );
        assert_eq!(r("bytes=10-19").unwrap().len(), 10);
    }

    #[test]
    fn bad_ranges() {
        let r = |h: &str| ByteRange::parse(h, 1000);
        assert_eq!(r("bytes=1000-"), Err(RangeError::Unsatisfiable));
        assert_eq!(r("bytes=-0"), Err(RangeError::Unsatisfiable));
        for bad in [
            "items=0-1",
            "bytes=a-b",
            "bytes=5-1",
            "bytes=0-1,5-6",
            "bytes=-",
            "bytes=+1-2",
            "bytes=1",
        ] {
            assert_eq!(r(bad), Err(RangeError::Malformed), "{bad}");
        }
        assert_eq!(
            ByteRange::parse("bytes=0-", 0),
            Err(RangeError::Unsatisfiable)
        );
    }

    proptest::proptest! {
        #[test]
        fn parsed_ranges_lie_inside_the_blob(h in "\\PC{0,30}", size in 0u64..10_000) {
            if let Ok(r) = ByteRange::parse(&h, size) {
                proptest::prop_assert!(r.start <= r.end && r.end < size);
            }
        }

        #[test]
        fn well_formed_ranges_parse(a in 0u64..20_000, len in 1u64..20_000, size in 1u64..10_000) {
            let r = ByteRange::parse(&format!("bytes={a}-{}", a + len - 1), size);
            if a < size {
                let r = r.unwrap();
                proptest::prop_assert_eq!(r.start, a);
                proptest::prop_assert_eq!(r.end, (a + len - 1).min(size - 1));
            } else {
                proptest::prop_assert_eq!(r, Err(RangeError::Unsatisfiable));
            }
        }
    }
}
