//! Serves an in-memory export, for trying clients against the protocol code alone.
//!
//! `cargo run -p blockguard-nbd --example memserve -- SOCKET_OR_ADDR [SIZE_MIB]`

use blockguard_nbd::{ListenAddr, MemoryExport, Server, ServerConfig};
use std::sync::Arc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    tracing::info!("memserve starting");
    let mut args = std::env::args().skip(1);
    let target = args.next().ok_or("usage: memserve SOCKET|ADDR [SIZE_MIB]")?;
    let mib: u64 = args.next().map_or(Ok(64), |s| s.parse())?;
    let addr = match target.parse() {
        Ok(a) => ListenAddr::Tcp(a),
        Err(_) => ListenAddr::Unix(target.into()),
    };
    let export = Arc::new(MemoryExport::new(mib << 20, 4096));
    let cfg = ServerConfig {
        workers: std::env::var("WORKERS")
            .ok()
            .and_then(|w| w.parse().ok())
            .unwrap_or(0),
        ..ServerConfig::default()
    };
    let server = Server::bind(&addr, export, cfg)?;
    blockguard_nbd::shutdown_on_signals(&server.shutdown_handle())?;
    server.run()?;
    Ok(())
}
