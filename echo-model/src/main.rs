//! `echo-model`: run the local echo model (mock OpenAI Realtime and GPT-Live WebRTC provider)
//! standalone.

use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Context};
use clap::Parser;
use echo_model::provider::{CallLimits, MockProvider, ProviderConfig};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "echo-model",
    about = "LOCAL ECHO MODEL: a mock OpenAI Realtime and GPT-Live WebRTC provider that echoes audio and events. Not a real model."
)]
struct Args {
    /// HTTP address for `POST /v1/realtime/calls` and `POST /v1/live/sessions`.
    #[arg(long, default_value = "127.0.0.1:8089")]
    http_addr: SocketAddr,
    /// IP to bind per-call UDP sockets on and advertise in ICE host candidates.
    #[arg(long, default_value = "127.0.0.1")]
    media_ip: IpAddr,
    /// Name of an environment variable holding the API key clients must present as
    /// `Authorization: Bearer <key>`. Without it any non-empty bearer token is accepted.
    #[arg(long)]
    api_key_env: Option<String>,
    /// End calls not connected (ICE + DTLS) within this many seconds.
    #[arg(long, default_value_t = 15)]
    connect_timeout_secs: u64,
    /// End calls that receive no datagram for this many seconds.
    #[arg(long, default_value_t = 30)]
    idle_timeout_secs: u64,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long)]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,str0m=warn,dimpl=warn"));
    if args.log_json {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }

    let api_key = match &args.api_key_env {
        Some(name) => {
            let key = std::env::var(name).with_context(|| {
                format!("environment variable {name} (from --api-key-env) is not set")
            })?;
            if key.trim().is_empty() {
                bail!("environment variable {name} (from --api-key-env) is empty");
            }
            Some(key.trim().to_string())
        }
        None => None,
    };
    let auth_mode = if api_key.is_some() {
        "a specific API key is required"
    } else {
        "any non-empty bearer token is accepted"
    };

    let config = ProviderConfig {
        http_addr: args.http_addr,
        media_ip: args.media_ip,
        api_key,
        reject_with: None,
    };
    let limits = CallLimits {
        connect_timeout: std::time::Duration::from_secs(args.connect_timeout_secs),
        idle_timeout: std::time::Duration::from_secs(args.idle_timeout_secs),
        ..CallLimits::default()
    };
    let provider = MockProvider::start_with_limits(config, limits).await?;

    eprintln!("==================================================================");
    eprintln!(" LOCAL ECHO MODEL - this is NOT a real model.");
    eprintln!(" It speaks the OpenAI Realtime and GPT-Live WebRTC protocols and");
    eprintln!(" echoes back every audio packet and data-channel event it receives.");
    eprintln!(" POST {}/v1/realtime/calls", provider.base_url());
    eprintln!(" POST {}/v1/live/sessions", provider.base_url());
    eprintln!(
        " media on {} (UDP, one ephemeral port per call)",
        args.media_ip
    );
    eprintln!(" auth: {auth_mode}");
    eprintln!("==================================================================");

    shutdown_signal().await?;
    tracing::info!("signal received; stopping calls and HTTP server");
    provider.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}
