//! Parsers for command-line values that both binaries take; errors name the offending value.

use crate::reference::Registry;

/// Parses an upstream allowlist entry (see [`Registry`]'s `FromStr`).
pub fn parse_registry(s: &str) -> Result<Registry, String> {
    s.parse().map_err(|e| format!("{e}"))
}

/// Parses a positive number of seconds (`30`, `2.5`), at most a day.
pub fn parse_seconds(s: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !secs.is_finite() || secs <= 0.0 || secs > 86_400.0 {
        return Err(format!(
            "{s:?}: must be more than 0 and at most 86400 seconds"
        ));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
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

/// Parses a TCP congestion control name (`cubic`, `reno`, `bbr`): what the kernel's
/// `TCP_CONGESTION` takes, letters, digits and `_`, at most 15 of them.
pub fn parse_congestion(s: &str) -> Result<String, String> {
    let t = s.trim();
    if t.len() > 15 || !t.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "{s:?} is not a TCP congestion control name (like cubic or reno)"
        ));
    }
    Ok(t.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn congestion_names() {
        assert_eq!(parse_congestion(" cubic ").unwrap(), "cubic");
        assert_eq!(parse_congestion("").unwrap(), "");
        for bad in ["cu-bic", "a b", "sixteen_letters_", "bbr;rm"] {
            let e = parse_congestion(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds("30").unwrap().as_secs(), 30);
        assert_eq!(parse_seconds(" 2.5 ").unwrap().as_millis(), 2500);
        for bad in ["0", "-1", "soon", "inf", "NaN", "1e9"] {
            let e = parse_seconds(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

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
