use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = bay_proxy::Config::parse();
    bay_common::logging::init(config.log_format);
    bay_common::open_files::raise_and_log();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    bay_proxy::run(config, listener, bay_common::shutdown::signal()).await
}
