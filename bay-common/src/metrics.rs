//! What operators watch: the Prometheus exposition both services answer `GET /metrics` with,
//! and the per-image ledger of bytes served against bytes fetched upstream behind the stats
//! endpoints' "saved" figures.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
pub use prometheus_client;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::registry::Registry;

use crate::api::{ImageSavings, SavingsReport};

/// OpenMetrics text, which Prometheus and every compatible scraper understand.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The metrics of `registry` as a `/metrics` response.
pub fn render(registry: &Registry) -> Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// Brings a counter up to a total kept elsewhere (the store's evictions, librqbit's upload
/// bytes), read when scraped. Callers serialise scrapes, or two could add the same step.
pub fn catch_up(counter: &prometheus_client::metrics::counter::Counter, total: u64) {
    let seen = counter.get();
    if total > seen {
        counter.inc_by(total - seen);
    }
}

/// A label set with one label, for the many metrics split by a single dimension.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Source {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

/// Images tracked one by one; beyond this, their bytes count under [`OTHER_IMAGES`], so a
/// client inventing repository names cannot grow the ledger without bound.
pub const MAX_IMAGES: usize = 1024;
pub const OTHER_IMAGES: &str = "(other)";

/// Bytes served and fetched upstream, per image (`<registry>/<repository>`).
#[derive(Default)]
pub struct Ledger {
    images: Mutex<HashMap<String, ImageSavings>>,
}

impl Ledger {
    /// Blob bytes this service delivered for `image` (to clients, or as torrents to proxies).
    pub fn served(&self, image: &str, bytes: u64) {
        self.with(image, |s| s.bytes_served += bytes);
    }

    /// Blob bytes this service fetched from upstream for `image`.
    pub fn fetched(&self, image: &str, bytes: u64) {
        self.with(image, |s| s.bytes_from_upstream += bytes);
    }

    fn with(&self, image: &str, f: impl FnOnce(&mut ImageSavings)) {
        let mut images = self.images.lock().expect("ledger poisoned");
        let key = if images.contains_key(image) || images.len() < MAX_IMAGES {
            image
        } else {
            OTHER_IMAGES
        };
        f(images.entry(key.to_string()).or_default());
    }

    pub fn report(&self) -> SavingsReport {
        let images = self.images.lock().expect("ledger poisoned");
        let mut total = ImageSavings::default();
        let mut out = BTreeMap::new();
        for (name, s) in images.iter() {
            total.bytes_served += s.bytes_served;
            total.bytes_from_upstream += s.bytes_from_upstream;
            out.insert(name.clone(), s.with_saved());
        }
        SavingsReport {
            total: total.with_saved(),
            images: out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;

    #[test]
    fn ledger_totals_and_bound() {
        let l = Ledger::default();
        l.served("r/a", 300);
        l.fetched("r/a", 100);
        l.served("r/b", 50);
        l.fetched("r/b", 80);
        let r = l.report();
        assert_eq!(r.images["r/a"].bytes_saved, 200);
        // Fetched more than served (a fallback that died) saves nothing, never negative.
        assert_eq!(r.images["r/b"].bytes_saved, 0);
        assert_eq!(r.total.bytes_served, 350);
        assert_eq!(r.total.bytes_from_upstream, 180);
        assert_eq!(r.total.bytes_saved, 170);
        for i in 0..MAX_IMAGES + 10 {
            l.served(&format!("r/x{i}"), 1);
        }
        let r = l.report();
        assert_eq!(r.images.len(), MAX_IMAGES + 1);
        assert_eq!(r.images[OTHER_IMAGES].bytes_served, 12);
        assert_eq!(r.total.bytes_served, 350 + MAX_IMAGES as u64 + 10);
    }

    #[tokio::test]
    async fn renders_openmetrics() {
        let mut reg = Registry::default();
        let f = Family::<Source, Counter>::default();
        reg.register("bay_example_bytes", "Example", f.clone());
        f.get_or_create(&Source { source: "cache" }).inc_by(5);
        let resp = render(&reg);
        assert!(
            resp.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("application/openmetrics-text")
        );
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            text.contains("bay_example_bytes_total{source=\"cache\"} 5"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
