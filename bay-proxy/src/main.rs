use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = bay_proxy::Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    bay_proxy::run(config, listener, bay_common::shutdown::signal()).await
}
