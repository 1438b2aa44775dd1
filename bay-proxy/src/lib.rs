//! The proxy lands with its own issue.
