//! Where the services' logs go and in what form: text for people (coloured only on a
//! terminal), or one JSON object per line for log shippers, with every field of an event and
//! of its spans (digest, repository, sizes, bytes by source) as a field of its own.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; ANSI colours only when standard output is a terminal and
    /// `NO_COLOR` is not set.
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, the message and the event's
    /// fields at the top level, and the enclosing spans' fields under `spans`.
    Json,
}

/// Installs the global subscriber; the filter is `RUST_LOG`, `info` by default.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.with_ansi(colour()).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .init(),
    }
}

fn colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
