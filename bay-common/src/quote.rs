//! How error messages quote a value they reject. A leaf of the crate: the wire types (digests,
//! names, announce parameters, manifests) use it, and the API types sit above them.

/// A rejected value as error messages quote it: cut to `max_chars` characters, so a client
/// cannot make bay echo megabytes back (or into its log).
pub(crate) fn shown(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((end, _)) => format!("{}…", &s[..end]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_are_cut_on_a_character_boundary() {
        assert_eq!(shown("abc", 5), "abc");
        assert_eq!(shown("abcdef", 3), "abc…");
        assert_eq!(shown("ééé", 2), "éé…");
    }
}
