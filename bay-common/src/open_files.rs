//! The open-files limit. Each blob a node seeds keeps its file open in librqbit, and the
//! tracker's fast resume keeps each blob's bitfield file open too, on top of every peer and
//! client connection; the soft limit many hosts start services with (1024 under systemd) is
//! reached with a few hundred blobs. Raising the soft limit to the hard one, as Go does for
//! every program, is what a server with many open files is expected to do.

/// Raises this process's soft limit on open files to its hard limit. Returns the limits
/// before and after when it changed.
pub fn raise_to_hard() -> std::io::Result<Option<(u64, u64)>> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur >= lim.rlim_max {
        return Ok(None);
    }
    let before = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Some((before, lim.rlim_max)))
}

/// Raises the limit and says so in the log; a failure is logged, not fatal.
pub fn raise_and_log() {
    match raise_to_hard() {
        Ok(Some((from, to))) => tracing::info!(from, to, "raised the open-files limit"),
        Ok(None) => {}
        Err(e) => tracing::warn!("cannot raise the open-files limit: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> (u64, u64) {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct passed to it.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        (lim.rlim_cur, lim.rlim_max)
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let (_, hard) = limits();
        let low = hard.min(256);
        let lowered = libc::rlimit {
            rlim_cur: low,
            rlim_max: hard,
        };
        // SAFETY: setrlimit only reads the struct passed to it.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) }, 0);
        let changed = raise_to_hard().unwrap();
        assert_eq!(limits(), (hard, hard));
        if low < hard {
            assert_eq!(changed, Some((low, hard)));
        }
        // Already at the hard limit: nothing to do.
        assert_eq!(raise_to_hard().unwrap(), None);
    }
}
