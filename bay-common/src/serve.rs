//! Serving an axum app over HTTP/1.1 and HTTP/2 with the limits axum's own `serve` does not set.
//!
//! A client that opens a connection and sends its request headers slowly (or never) would
//! otherwise hold a connection and a task forever; here it gets [`HEADER_READ_TIMEOUT`].
//! Oversized URLs and header sections are refused by hyper (414, 431).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tower::ServiceExt;

/// How long a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Both ends of a connection, available to handlers as `ConnectInfo<Conn>`: the remote is the
/// client, the local address is how the client reached us.
#[derive(Clone, Copy, Debug)]
pub struct Conn {
    pub remote: SocketAddr,
    pub local: SocketAddr,
}

/// Gives the connections `listener` accepts the first TCP congestion control of `names` the
/// kernel lets this process use (an accepted socket keeps its listener's); the one chosen,
/// None if `names` is empty (the system's default stays). Unprivileged processes may use only
/// what `net.ipv4.tcp_allowed_congestion_control` lists, which always has `reno`.
pub fn set_congestion_control(
    listener: &TcpListener,
    names: &[String],
) -> Result<Option<String>, String> {
    let names: Vec<&str> = names
        .iter()
        .map(|n| n.trim())
        .filter(|n| !n.is_empty())
        .collect();
    let mut failed = Vec::new();
    for name in &names {
        match set_one(listener, name) {
            Ok(()) => return Ok(Some((*name).to_owned())),
            Err(e) => failed.push(format!("{name}: {}", congestion_error(&e))),
        }
    }
    if names.is_empty() {
        Ok(None)
    } else {
        Err(format!(
            "no TCP congestion control of {names:?} can be used ({})",
            failed.join("; ")
        ))
    }
}

/// Says what the kernel's answer means for this choice.
fn congestion_error(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "this kernel has no such congestion control".into(),
        std::io::ErrorKind::PermissionDenied => "not in net.ipv4.tcp_allowed_congestion_control \
             (add it there, or give the process CAP_NET_ADMIN)"
            .into(),
        _ => e.to_string(),
    }
}

#[cfg(target_os = "linux")]
fn set_one(listener: &TcpListener, name: &str) -> std::io::Result<()> {
    socket2::SockRef::from(listener).set_tcp_congestion(name.as_bytes())
}

#[cfg(not(target_os = "linux"))]
fn set_one(_: &TcpListener, _: &str) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// Serves `app` on `listener` until `shutdown` resolves; then stops accepting, lets requests
/// in flight finish for up to `drain`, and cuts what is left.
///
/// The accept loop runs as a task of its own, on the worker pool with the connections: on the
/// caller's thread (`main`, outside the pool) it took a fifth of the tracker's samples in the
/// announce benchmark's profile, every connection handed across threads.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
    drain: Duration,
) -> std::io::Result<()> {
    tokio::spawn(serve_with(
        listener,
        app,
        shutdown,
        HEADER_READ_TIMEOUT,
        drain,
    ))
    .await
    .map_err(std::io::Error::other)?
}

async fn serve_with(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()>,
    header_timeout: Duration,
    drain: Duration,
) -> std::io::Result<()> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, remote) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let local = stream.local_addr().unwrap_or(remote);
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut()
                .insert(ConnectInfo(Conn { remote, local }));
            app.clone().oneshot(req)
        });
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        while connections.try_join_next().is_some() {}
        connections.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%remote, "connection ended: {e}");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after {drain:?}; cutting them");
    }
    connections.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The congestion control the connection accepted on `listener` from a fresh client uses.
    async fn accepted_congestion(listener: &TcpListener) -> String {
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (accepted, _client) = tokio::join!(listener.accept(), client);
        let (stream, _) = accepted.unwrap();
        let name = socket2::SockRef::from(&stream).tcp_congestion().unwrap();
        String::from_utf8_lossy(&name)
            .trim_end_matches('\0')
            .to_owned()
    }

    #[tokio::test]
    async fn accepted_connections_get_the_first_congestion_control_the_kernel_takes() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let system = accepted_congestion(&listener).await;
        assert_eq!(set_congestion_control(&listener, &[]).unwrap(), None);
        assert_eq!(
            set_congestion_control(&listener, &names(&[" "])).unwrap(),
            None
        );
        assert_eq!(accepted_congestion(&listener).await, system);

        // reno is built into every Linux kernel and allowed to every process.
        let chosen = set_congestion_control(&listener, &names(&["no_such_cc", "reno"])).unwrap();
        assert_eq!(chosen.as_deref(), Some("reno"));
        assert_eq!(accepted_congestion(&listener).await, "reno");

        let err = set_congestion_control(&listener, &names(&["no_such_cc"])).unwrap_err();
        assert!(err.contains("no_such_cc"), "{err}");
        // A failed choice leaves the last one in place.
        assert_eq!(accepted_congestion(&listener).await, "reno");
    }

    #[tokio::test]
    async fn slow_headers_oversized_requests_and_conn_info() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route(
            "/who",
            get(|ConnectInfo(c): ConnectInfo<Conn>| async move {
                format!("{} {}", c.remote.ip(), c.local)
            }),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let header_timeout = Duration::from_millis(500);
        let server = tokio::spawn(serve_with(
            listener,
            app,
            async {
                let _ = stopped.await;
            },
            header_timeout,
            Duration::from_secs(1),
        ));
        let exchange = |req: Vec<u8>| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(&req).await.unwrap();
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            String::from_utf8_lossy(&out).into_owned()
        };
        let r =
            exchange(b"GET /who HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec()).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.ends_with(&format!("127.0.0.1 {addr}")), "{r}");
        let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(100_000));
        assert!(
            exchange(long.into_bytes())
                .await
                .starts_with("HTTP/1.1 414")
        );
        let mut many = b"GET /who HTTP/1.1\r\nHost: x\r\n".to_vec();
        for i in 0..500 {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(exchange(many).await.starts_with("HTTP/1.1 431"));

        // A client that never finishes its headers is cut off.
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /who HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let read = tokio::time::timeout(header_timeout * 10, slow.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "slow client still connected");
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn shutdown_finishes_requests_in_flight_and_cuts_the_rest() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let started = std::sync::Arc::new(tokio::sync::Notify::new());
        let on_start = started.clone();
        let streaming = std::sync::Arc::new(tokio::sync::Notify::new());
        let on_stream = streaming.clone();
        let app = Router::new()
            .route(
                "/quick",
                get(move || async move {
                    on_start.notify_one();
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "done"
                }),
            )
            .route(
                "/endless",
                get(move || async move {
                    on_stream.notify_one();
                    let s = futures::stream::unfold((), |()| async {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Some((Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"x")), ()))
                    });
                    axum::body::Body::from_stream(s)
                }),
            );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let drain = Duration::from_millis(800);
        let server = tokio::spawn(serve_with(
            listener,
            app,
            async {
                let _ = stopped.await;
            },
            HEADER_READ_TIMEOUT,
            drain,
        ));
        let request = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            String::from_utf8_lossy(&out).into_owned()
        };
        let quick = tokio::spawn(request("/quick"));
        started.notified().await;
        let endless = tokio::spawn(request("/endless"));
        streaming.notified().await;
        let t0 = std::time::Instant::now();
        let _ = stop.send(());
        // New connections are refused once shutdown began.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
        let quick = quick.await.unwrap();
        assert!(
            quick.starts_with("HTTP/1.1 200") && quick.ends_with("done"),
            "{quick}"
        );
        let endless = tokio::time::timeout(Duration::from_secs(5), endless)
            .await
            .expect("a response outliving the drain deadline is cut")
            .unwrap();
        assert!(endless.starts_with("HTTP/1.1 200"), "{endless}");
        // Chunked and never finished: no terminating zero-length chunk.
        assert!(!endless.ends_with("0\r\n\r\n"), "{endless}");
        server.await.unwrap().unwrap();
        let took = t0.elapsed();
        assert!(took >= drain && took < drain * 4, "{took:?}");
    }
}
