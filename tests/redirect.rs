//! A registry that sends blob downloads to another host, as registries on S3 or GCS do with
//! pre-signed URLs (here Distribution's `redirect` storage middleware and a file server on its
//! own loopback address): bay-tracker follows the 307 and leaves the caller's credentials
//! behind.

use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use bay_common::torrent::BlobTorrent;
use bay_tests::{Image, Registry, RegistryOptions, Tracker, http_client, loopback_ip};

const USER: &str = "alice";
const PASSWORD: &str = "s3cret";

/// One request the storage server answered.
#[derive(Clone, Debug)]
struct StorageRequest {
    method: Method,
    path: String,
    /// Whether it carried `Authorization` or `Proxy-Authorization` (never their values).
    credentials: bool,
    status: StatusCode,
}

/// A read-only file server for the registry's storage root.
#[derive(Default)]
struct Storage {
    /// Set once the registry, which needs the server's address first, has its data dir.
    root: OnceLock<PathBuf>,
    seen: Mutex<Vec<StorageRequest>>,
}

impl Storage {
    fn seen(&self) -> Vec<StorageRequest> {
        self.seen.lock().unwrap().clone()
    }

    async fn answer(&self, method: &Method, path: &str) -> Response {
        if method != Method::GET && method != Method::HEAD {
            return StatusCode::METHOD_NOT_ALLOWED.into_response();
        }
        let Some(root) = self.root.get() else {
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        };
        let relative = Path::new(path.trim_start_matches('/'));
        if !relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
        {
            return StatusCode::BAD_REQUEST.into_response();
        }
        match tokio::fs::read(root.join(relative)).await {
            Ok(bytes) => {
                ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response()
            }
            Err(_) => StatusCode::NOT_FOUND.into_response(),
        }
    }
}

async fn storage_handler(
    State(storage): State<Arc<Storage>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let resp = storage.answer(&method, uri.path()).await;
    storage.seen.lock().unwrap().push(StorageRequest {
        method,
        path: uri.path().to_string(),
        credentials: headers.contains_key(header::AUTHORIZATION)
            || headers.contains_key(header::PROXY_AUTHORIZATION),
        status: resp.status(),
    });
    resp
}

/// Where Distribution's filesystem driver keeps a blob's bytes, relative to its root.
fn storage_path(digest: &str) -> String {
    let hex = digest.strip_prefix("sha256:").unwrap();
    format!("/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2])
}

#[tokio::test(flavor = "multi_thread")]
async fn tracker_follows_a_storage_redirect_without_the_callers_credentials() {
    // The storage server's address goes into the registry's config, so it is bound first.
    let listener = tokio::net::TcpListener::bind((loopback_ip(), 0))
        .await
        .unwrap();
    let storage_url = format!("http://{}", listener.local_addr().unwrap());
    let storage = Arc::new(Storage::default());
    let app = Router::new()
        .fallback(storage_handler)
        .with_state(storage.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let registry = Registry::start_redirecting(
        RegistryOptions {
            htpasswd: Some((USER.into(), PASSWORD.into())),
        },
        &storage_url,
    )
    .await
    .unwrap();
    storage.root.set(registry.data_dir()).unwrap();
    let image = Image::generate(&[2 << 20, 300_000], 11).unwrap();
    image
        .push(&registry, "private/img:1", Some((USER, PASSWORD)))
        .await
        .unwrap();
    let layer = &image.layers[0];
    // Pushing reads no blobs back, but count anything it did.
    let pushed = storage.seen().len();

    // The registry redirects authorized GETs and HEADs to the storage driver path, and still
    // answers everyone else with its own 401.
    let no_follow = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let blob_url = format!("{}/v2/private/img/blobs/{}", registry.url(), layer.digest);
    for method in [Method::GET, Method::HEAD] {
        let resp = no_follow
            .request(method.clone(), &blob_url)
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::TEMPORARY_REDIRECT, "{method}");
        assert_eq!(
            resp.headers()[header::LOCATION],
            format!("{storage_url}{}", storage_path(&layer.digest)),
            "{method}"
        );
        let anonymous = no_follow
            .request(method.clone(), &blob_url)
            .send()
            .await
            .unwrap();
        assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED, "{method}");
    }
    assert_eq!(
        storage.seen().len(),
        pushed,
        "nothing above followed a redirect"
    );

    let tracker = Tracker::start(&[registry.url()], &[]).await.unwrap();
    let torrent_url = format!(
        "{}/v1/torrents/{}/private/img/blobs/{}",
        tracker.url(),
        registry.authority(),
        layer.digest
    );
    let resp = http_client()
        .get(&torrent_url)
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{}", tracker.log_text());
    let torrent = BlobTorrent::from_metainfo(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(torrent.digest().to_string(), layer.digest);
    assert_eq!(torrent.size(), layer.size);

    // The bytes came from the storage server, fetched without the caller's credentials.
    let fetched: Vec<_> = storage.seen().split_off(pushed);
    assert_eq!(fetched.len(), 1, "{fetched:?}");
    assert_eq!(fetched[0].method, Method::GET);
    assert_eq!(fetched[0].path, storage_path(&layer.digest));
    assert_eq!(fetched[0].status, StatusCode::OK);
    assert!(!fetched[0].credentials, "{fetched:?}");
    // Ours above, and the tracker's.
    assert_eq!(registry.blob_gets(&layer.digest), 2);

    // Holding the blob changes nothing for a caller the registry refuses.
    let anonymous = http_client().get(&torrent_url).send().await.unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert!(!tracker.log_text().contains(PASSWORD));
    assert!(
        storage.seen().iter().all(|r| !r.credentials),
        "{:?}",
        storage.seen()
    );

    // The storage server does notice credentials when it gets them.
    let direct = http_client()
        .get(format!("{storage_url}{}", storage_path(&layer.digest)))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap();
    assert_eq!(direct.bytes().await.unwrap().len() as u64, layer.size);
    assert!(storage.seen().last().unwrap().credentials);
}
