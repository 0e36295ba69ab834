//! The sideband through the real Envoy: an application server attaches to a call the gateway
//! set up, with the gateway's id and its own gateway key, and the filter holds the WebSocket
//! upgrade, asks the relay whose call it is and where it runs, and lets Envoy carry it to the
//! worker's cluster under the provider's id with the worker's key. Proven for both APIs
//! (Realtime `GET /v1/realtime?call_id=…`, GPT-Live `GET /v1/live/sessions/{id}/attach`):
//! the call's events arrive on the socket, a `session.update` sent on it reaches the call;
//! a stranger's attach, an unknown id and a forged cluster header go nowhere.

mod common;

use common::*;
use e2e::{EnvoyOptions, Paths, RunDir};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const BACKEND_KEY: &str = "sk-gw-e2e-sideband-backend-5e1a";
const STRANGER_KEY: &str = "sk-gw-e2e-sideband-stranger-9d0c";

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn attach(
    listen: std::net::SocketAddr,
    path: &str,
    key: &str,
    extra: &[(&str, &str)],
) -> Result<Ws, (u16, String)> {
    let mut req = format!("ws://{listen}{path}")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    for (k, v) in extra {
        let name: tokio_tungstenite::tungstenite::http::HeaderName = k.parse().unwrap();
        req.headers_mut().insert(name, v.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            let body = r
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            Err((r.status().as_u16(), body))
        }
        Err(e) => panic!("{e}"),
    }
}

async fn next_of(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let m = tokio::time::timeout(T, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no {kind} on the sideband"))
            .expect("the socket is open")
            .expect("a frame");
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == kind {
                return v;
            }
        }
    }
}

/// Runs e2e/tests/openai_sdk/sideband.py (the official SDK's own sideband clients) with
/// `args` against the gateway at `listen`; its JSON answer.
fn sdk(listen: std::net::SocketAddr, args: &[&str]) -> Value {
    let paths = Paths::discover();
    assert!(
        xtask::setup::openai_sdk_installed(&paths),
        "the openai Python SDK is not in {}: run `cargo xtask setup`",
        paths.venv().display()
    );
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("openai_sdk")
        .join("sideband.py");
    let out = std::process::Command::new(paths.venv_python())
        .arg(script)
        .args(args)
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env("GATEWAY_BASE_URL", format!("http://{listen}/v1"))
        .env("BACKEND_KEY", BACKEND_KEY)
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the SDK script ({args:?}) failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn code(e: &(u16, String)) -> String {
    serde_json::from_str::<Value>(&e.1)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
        .unwrap_or_default()
}

#[test]
fn a_server_attaches_to_its_calls_through_envoy_and_strangers_do_not() {
    attach_in_mode(true);
}

/// The same without `allow_on_headers_stop_iteration`, as Istio's WasmPlugin runs the filter
/// (`continue_headers`): Envoy turns the filter's pause in the headers into StopAll, which
/// holds an upgrade (it has no body) just as well.
#[test]
fn without_the_pause_flag_the_sideband_is_held_and_rewritten_too() {
    attach_in_mode(false);
}

fn attach_in_mode(pause_flag: bool) {
    let rt = runtime();
    let p = provider(&rt, KEY);
    let paths = Paths::discover();
    let dir = RunDir::new(&format!("sideband-{pause_flag}")).unwrap();
    let relay = e2e::start_relay(&paths, &dir, "relay", &[p.base_url()]).unwrap();
    let cfg = plugin_config(
        json!([
            { "name": "gpt-realtime", "pools": ["main"] },
            { "name": "gpt-live-1", "api": "live", "pools": ["main"] }
        ]),
        json!([{ "name": "main", "key_policy": "inject_if_missing", "callers": ["api_key"],
                 "workers": [{ "id": "worker-1", "base_url": p.base_url(),
                               "key_env": "OPENAI_API_KEY", "cluster": "provider" }] }]),
        json!({ "continue_headers": !pause_flag, "callers": { "api_keys": [
            { "name": "backend", "key_env": "DEMO_BACKEND_KEY" },
            { "name": "stranger", "key_env": "STRANGER_KEY" }
        ] } }),
    );
    let envoy = EnvoyOptions {
        relay_port: Some(relay.grpc.port()),
        provider_port: Some(p.local_addr().port()),
        plugin_config: Some(cfg),
        env: vec![
            ("OPENAI_API_KEY".into(), KEY.into()),
            ("DEMO_BACKEND_KEY".into(), BACKEND_KEY.into()),
            ("STRANGER_KEY".into(), STRANGER_KEY.into()),
        ],
        patches: vec![(
            "allow_on_headers_stop_iteration: true".into(),
            format!("allow_on_headers_stop_iteration: {pause_flag}"),
        ), (
            r#"host_env_keys: ["OPENAI_API_KEY", "EPHEMERAL_SIGNING_KEY", "DEMO_BACKEND_KEY"]"#.into(),
            r#"host_env_keys: ["OPENAI_API_KEY", "EPHEMERAL_SIGNING_KEY", "DEMO_BACKEND_KEY", "STRANGER_KEY"]"#.into(),
        )],
        ..Default::default()
    }
    .start(&paths, &dir)
    .unwrap();
    wait_relay_healthy(&envoy, "relay");
    let listen = envoy.listen();
    let auth = format!("Bearer {BACKEND_KEY}");

    // A Realtime call by the backend.
    let (c, offer) = new_client();
    let r = post_sdp(&envoy, CALLS, &offer, &[("authorization", &auth)]);
    let id = created(&r);
    let mut c = exercise(&rt, c, &r.text());

    rt.block_on(async {
        // A stranger, an unknown id, no key: no socket, nothing reaches the provider.
        let path = format!("/v1/realtime?call_id={id}");
        let e = attach(listen, &path, STRANGER_KEY, &[])
            .await
            .expect_err("refused");
        assert_eq!((e.0, code(&e).as_str()), (404, "call_not_found"), "{e:?}");
        let e = attach(
            listen,
            "/v1/realtime?call_id=rtc_00000000000000000000000000000000",
            BACKEND_KEY,
            &[],
        )
        .await
        .expect_err("refused");
        assert_eq!(e.0, 404, "{e:?}");
        assert!(p.sideband_attaches().is_empty());
        // A forged cluster header is removed: the request is the filter's again.
        let e = attach(
            listen,
            "/v1/realtime?call_id=rtc_00000000000000000000000000000000",
            BACKEND_KEY,
            &[("x-realtime-sideband-cluster", "relay")],
        )
        .await
        .expect_err("refused");
        assert_eq!(e.0, 404, "{e:?}");

        // The owner attaches with the gateway id.
        let mut ws = attach(listen, &path, BACKEND_KEY, &[])
            .await
            .expect("attached");
        let upstream_id = p
            .sideband_attaches()
            .pop()
            .expect("the provider saw the attach");
        assert_ne!(upstream_id, id, "the provider's own id went upstream");
        // The call's events reach the server.
        c.send_text(r#"{"type":"response.create","event_id":"sb-1"}"#)
            .await
            .unwrap();
        assert_eq!(
            next_of(&mut ws, "response.create").await["event_id"],
            "sb-1"
        );
        assert!(next_of(&mut ws, "response.done").await["response"]["usage"].is_object());
        // The server steers the call: its session.update reaches the client as session.updated.
        ws.send(Message::Text(
            json!({"type": "session.update", "session": {"instructions": "from the server"}})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
        let updated = c.wait_for_event_type("session.updated", T).await.unwrap();
        assert_eq!(updated["session"]["instructions"], "from the server");
        let _ = ws.close(None).await;
    });

    // A Live session by the backend, and its attach.
    let (lc, offer) = new_client();
    let body = json!({ "session": { "model": "gpt-live-1" },
                       "transport": { "type": "webrtc", "sdp": offer } });
    let r = post(
        &envoy,
        "/v1/live/sessions",
        &[
            ("content-type", "application/json"),
            ("authorization", &auth),
        ],
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v: Value = serde_json::from_str(&r.text()).unwrap();
    let live_id = v["session"]["id"].as_str().unwrap().to_string();
    let lc = rt
        .block_on(lc.connect(v["transport"]["sdp"].as_str().unwrap()))
        .unwrap();
    rt.block_on(async {
        let path = format!("/v1/live/sessions/{live_id}/attach");
        let e = attach(listen, &path, STRANGER_KEY, &[])
            .await
            .expect_err("refused");
        assert_eq!(e.0, 404, "{e:?}");
        let mut ws = attach(listen, &path, BACKEND_KEY, &[])
            .await
            .expect("attached");
        let usage = next_of(&mut ws, "session.usage.updated").await;
        assert!(usage["usage"]["seconds"].as_f64().unwrap() > 0.0);
    });
    // The official SDK's own clients, as an application server would attach with them.
    let out = sdk(listen, &["realtime", &id]);
    assert_eq!(out["instructions"], "from the SDK", "{out}");
    assert_eq!(out["response_status"], "completed", "{out}");
    let updated = rt
        .block_on(c.wait_for_event_type("session.updated", T))
        .expect("the SDK's session.update reached the call");
    assert_eq!(updated["session"]["instructions"], "from the SDK");
    let out = sdk(listen, &["live", &live_id]);
    assert!(out["seconds"].as_f64().unwrap() > 0.0, "{out}");
    assert_eq!(envoy_stat(&envoy, "realtime_filter_requests_sideband"), 4.0);
    let logs = [envoy.log_text(), relay.log_text()];
    for l in logs {
        assert!(!l.contains(KEY) && !l.contains(BACKEND_KEY));
    }
    drop((c, lc));
}
