//! `relayctl`: drive the relay's gRPC API from a shell — list, inspect and hang up
//! calls, set one up from an SDP file, check health, and list services through
//! server reflection, and follow every call's life (`watch`). Output is JSON, one document
//! per command; `watch` prints one JSON object per line as events come.
//!
//! It is an operator's tool: `get` and `hangup` act as an operator (`operator: true`), so
//! they reach every call whoever owns it, and calls show their owner's principal.

use anyhow::{anyhow, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use realtime_relay_proto::v1;
use realtime_relay_proto::v1::relay_service_client::RelayServiceClient;
use serde_json::{json, Value};
use std::process::ExitCode;
use std::time::Duration;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(
    name = "relayctl",
    version,
    about = "Command-line client for the realtime relay's gRPC API"
)]
struct Cli {
    /// The relay's gRPC endpoint.
    #[arg(long, env = "RELAY_GRPC_URL", default_value = "http://127.0.0.1:50051")]
    relay: String,
    #[command(subcommand)]
    command: Command,
}

/// Which API the call speaks (`CreateCallRequest.api`).
#[derive(Clone, Copy, ValueEnum)]
enum Api {
    /// The Realtime API: `rtc_` ids, the offer to {upstream}/v1/realtime/calls.
    Realtime,
    /// GPT-Live: `live_` ids, JSON to {upstream}/v1/live/sessions.
    Live,
}

impl From<Api> for v1::Api {
    fn from(api: Api) -> Self {
        match api {
            Api::Realtime => v1::Api::Realtime,
            Api::Live => v1::Api::Live,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Live calls (and recently ended ones with --ended), with live calls per worker.
    List {
        #[arg(long)]
        ended: bool,
    },
    /// One call, whoever owns it (as an operator).
    Get { call_id: String },
    /// End a call, whoever owns it (as an operator).
    Hangup { call_id: String },
    /// Set up a call from an SDP offer file; prints the answer (or the upstream's rejection).
    Create {
        /// File with the client's SDP offer ("-" for standard input).
        #[arg(long)]
        offer: String,
        #[arg(long)]
        model: String,
        /// Which API the call speaks: its id's prefix and how the relay talks to the upstream.
        #[arg(long, value_enum, default_value = "realtime")]
        api: Api,
        /// The client's session, a JSON object (for example '{"instructions":"be brief"}');
        /// its model is replaced by --model upstream. None by default.
        #[arg(long, default_value = "")]
        session: String,
        /// Upstream base URL (must be on the relay's allowlist).
        #[arg(long)]
        upstream: String,
        #[arg(long, default_value = "cli")]
        worker: String,
        /// Name of an environment variable holding the upstream API key (never a flag,
        /// so it stays out of shell history and process listings).
        #[arg(long)]
        api_key_env: Option<String>,
        /// Principal that owns the call (an opaque id such as "p_<hex>", never a credential);
        /// none by default, and then any caller may see or end it.
        #[arg(long, default_value = "")]
        principal: String,
    },
    /// Follow every call's life (WatchCalls): one JSON object per line, as events come
    /// (created, connected, usage_updated, ended; lagged when this watcher fell behind).
    Watch {
        /// Stop after this many events (default: until the relay stops or Ctrl-C).
        #[arg(long)]
        count: Option<u64>,
    },
    /// gRPC health of the relay service.
    Health,
    /// Services the relay exposes, through gRPC server reflection.
    Services,
}

fn call_json(c: &v1::CallInfo) -> Value {
    let dir = |d: Option<v1::DirectionStats>| {
        let d = d.unwrap_or_default();
        json!({"rtp_packets": d.rtp_packets, "rtp_bytes": d.rtp_bytes, "dc_messages": d.dc_messages,
               "dc_bytes": d.dc_bytes, "dropped": d.dropped})
    };
    json!({
        "call_id": c.call_id,
        "state": v1::CallState::try_from(c.state).map(|s| s.as_str_name()).unwrap_or("UNKNOWN"),
        "model": c.model, "upstream_model": c.upstream_model, "worker_id": c.worker_id,
        "created_at_ms": c.created_at_ms, "connected_at_ms": c.connected_at_ms, "ended_at_ms": c.ended_at_ms,
        "end_reason": c.end_reason, "upstream_call_id": c.upstream_call_id, "principal": c.principal,
        "client_to_upstream": dir(c.client_to_upstream), "upstream_to_client": dir(c.upstream_to_client),
        "api": v1::Api::try_from(c.api).map(|a| a.as_str_name()).unwrap_or("UNKNOWN"),
        "usage": usage_json(c.usage.clone().unwrap_or_default()),
    })
}

fn usage_json(u: v1::CallUsage) -> Value {
    let t = u.tokens.unwrap_or_default();
    json!({
        "tokens": {"total": t.total_tokens, "input": t.input_tokens, "output": t.output_tokens,
                   "input_text": t.input_text_tokens, "input_audio": t.input_audio_tokens,
                   "input_image": t.input_image_tokens, "input_cached": t.input_cached_tokens,
                   "cached_text": t.cached_text_tokens, "cached_audio": t.cached_audio_tokens,
                   "cached_image": t.cached_image_tokens, "output_text": t.output_text_tokens,
                   "output_audio": t.output_audio_tokens},
        "responses": u.responses,
        "rate_limits": u.rate_limits.iter().map(|r| json!({"name": r.name, "limit": r.limit,
            "remaining": r.remaining, "reset_seconds": r.reset_seconds})).collect::<Vec<_>>(),
        "audio_seconds": u.audio_seconds,
        "partial": u.partial,
        "error_events": u.error_events,
    })
}

fn event_json(e: &v1::CallEvent) -> Value {
    let kind = v1::call_event::Kind::try_from(e.kind)
        .map(|k| k.as_str_name().to_ascii_lowercase())
        .unwrap_or_else(|_| "unknown".into());
    let mut v = json!({"event": kind, "at_ms": e.at_ms});
    if let Some(c) = &e.call {
        v["call"] = call_json(c);
    }
    if e.missed > 0 {
        v["missed"] = json!(e.missed);
    }
    v
}

async fn run(cli: Cli) -> Result<Option<Value>> {
    let channel = Channel::from_shared(cli.relay.clone())
        .context("bad --relay URL")?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(30))
        .connect()
        .await
        .with_context(|| format!("cannot reach the relay at {}", cli.relay))?;
    let mut relay = RelayServiceClient::new(channel.clone());
    // The relay's answer in one line: the gRPC code and its message.
    let status = |s: tonic::Status| anyhow!("{}: {}", s.code(), s.message());
    if let Command::Watch { count } = cli.command {
        // A stream with no end of its own: no request timeout on this channel.
        let channel = Channel::from_shared(cli.relay.clone())
            .context("bad --relay URL")?
            .connect_timeout(Duration::from_secs(3))
            .connect()
            .await
            .with_context(|| format!("cannot reach the relay at {}", cli.relay))?;
        let mut stream = RelayServiceClient::new(channel)
            .watch_calls(v1::WatchCallsRequest {})
            .await
            .map_err(status)?
            .into_inner();
        let mut seen = 0u64;
        while count.is_none_or(|n| seen < n) {
            let Some(event) = stream.message().await.map_err(status)? else {
                break;
            };
            println!("{}", event_json(&event));
            seen += 1;
        }
        return Ok(None);
    }
    Ok(Some(match cli.command {
        Command::List { ended } => {
            let r = relay
                .list_calls(v1::ListCallsRequest {
                    include_ended: ended,
                })
                .await
                .map_err(status)?
                .into_inner();
            let by_principal: serde_json::Map<String, Value> = r
                .live_usage_by_principal
                .iter()
                .map(|(p, u)| {
                    (
                        p.clone(),
                        json!({"live_calls": u.live_calls, "total_tokens": u.total_tokens,
                               "audio_seconds": u.audio_seconds}),
                    )
                })
                .collect();
            json!({"calls": r.calls.iter().map(call_json).collect::<Vec<_>>(),
                   "live_calls_by_worker": r.live_calls_by_worker,
                   "live_usage_by_principal": by_principal})
        }
        Command::Get { call_id } => call_json(
            &relay
                .get_call(v1::GetCallRequest {
                    call_id,
                    principal: String::new(),
                    operator: true,
                })
                .await
                .map_err(status)?
                .into_inner(),
        ),
        Command::Hangup { call_id } => {
            let r = relay
                .hangup_call(v1::HangupCallRequest {
                    call_id,
                    principal: String::new(),
                    operator: true,
                })
                .await
                .map_err(status)?
                .into_inner();
            r.call.as_ref().map(call_json).unwrap_or(Value::Null)
        }
        Command::Create {
            offer,
            model,
            api,
            session,
            upstream,
            worker,
            api_key_env,
            principal,
        } => {
            let sdp = if offer == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading the offer")?
            } else {
                std::fs::read_to_string(&offer).with_context(|| offer.clone())?
            };
            let authorization = match api_key_env {
                Some(name) => format!(
                    "Bearer {}",
                    std::env::var(&name).map_err(|_| anyhow!("${name} is not set"))?
                ),
                None => String::new(),
            };
            let r = relay
                .create_call(v1::CreateCallRequest {
                    model,
                    api: v1::Api::from(api) as i32,
                    session_json: session,
                    sdp_offer: sdp,
                    upstream: Some(v1::Upstream {
                        base_url: upstream,
                        authorization,
                        worker_id: worker,
                    }),
                    request_id: "relayctl".into(),
                    principal,
                    ..Default::default()
                })
                .await
                .map_err(status)?
                .into_inner();
            match r.outcome {
                Some(v1::create_call_response::Outcome::SdpAnswer(a)) => {
                    json!({"call_id": r.call_id, "sdp_answer": a})
                }
                Some(v1::create_call_response::Outcome::UpstreamRejection(u)) => {
                    json!({"call_id": r.call_id,
                    "upstream_rejection": {"status": u.status, "content_type": u.content_type,
                                           "body": String::from_utf8_lossy(&u.body)}})
                }
                None => return Err(anyhow!("the relay answered with no outcome")),
            }
        }
        Command::Health => {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let r = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: realtime_relay_proto::SERVICE_NAME.into(),
                })
                .await
                .map_err(status)?
                .into_inner();
            let s = tonic_health::pb::health_check_response::ServingStatus::try_from(r.status)
                .map(|s| s.as_str_name())
                .unwrap_or("UNKNOWN");
            json!({"service": realtime_relay_proto::SERVICE_NAME, "status": s})
        }
        Command::Services => {
            use tonic_reflection::pb::v1::{
                server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse, ServerReflectionRequest,
            };
            let mut client = ServerReflectionClient::new(channel);
            let req = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut stream = client
                .server_reflection_info(futures::stream::iter(vec![req]))
                .await
                .map_err(status)?
                .into_inner();
            let mut names = Vec::new();
            if let Some(resp) = stream.message().await.map_err(status)? {
                if let Some(MessageResponse::ListServicesResponse(l)) = resp.message_response {
                    names = l.service.into_iter().map(|s| s.name).collect();
                }
            }
            names.sort();
            json!({"services": names})
        }
        Command::Watch { .. } => unreachable!("handled above"),
    }))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(v) => {
            if let Some(v) = v {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("relayctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
