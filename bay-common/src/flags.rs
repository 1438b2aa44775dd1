//! Parsers for command-line values that both binaries take; errors name the offending value.

use crate::reference::Registry;

/// Parses an upstream allowlist entry (see [`Registry`]'s `FromStr`).
pub fn parse_registry(s: &str) -> Result<Registry, String> {
    s.parse().map_err(|e| format!("{e}"))
}

/// Parses `1234`, `64K`, `512M`, `50G`, `2T` (binary multiples; an optional `iB`/`B` suffix).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("invalid size {s:?}: unknown unit {c:?}")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected a number with an optional K/M/G/T"))?;
    n.checked_shl(shift)
        .filter(|v| v >> shift == n)
        .ok_or_else(|| format!("invalid size {s:?}: too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1234").unwrap(), 1234);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("50G").unwrap(), 50 << 30);
        assert_eq!(parse_size("2t").unwrap(), 2 << 40);
        for bad in ["", "G", "1.5G", "-1", "12Q", "99999999999T"] {
            let e = parse_size(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    proptest::proptest! {
        #[test]
        fn parse_size_never_panics(s in "\\PC{0,30}") {
            let _ = parse_size(&s);
        }

        #[test]
        fn parse_size_units(n in 0u64..(1 << 20), unit in 0usize..5) {
            let suffix = ["", "K", "M", "G", "T"][unit];
            proptest::prop_assert_eq!(parse_size(&format!("{n}{suffix}")).unwrap(), n << (10 * unit));
        }
    }
}
