//! The `realtime-relay` binary as an operator runs it: logs never carry a key or raw
//! SDP, and SIGTERM drains live calls, then exits.

mod common;

use common::UPSTREAM_KEY;
use echo_model::{ClientConfig, MockProvider, ProviderConfig, TestClient};
use realtime_relay_proto::v1;
use realtime_relay_proto::v1::relay_service_client::RelayServiceClient;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Kills the child by PID when dropped, even if the test panicked.
struct Relay {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Relay {
    fn spawn(provider_url: &str) -> Relay {
        let mut child = Command::new(env!("CARGO_BIN_EXE_realtime-relay"))
            .args([
                "--grpc-addr=127.0.0.1:0",
                "--metrics-addr=127.0.0.1:0",
                "--media-addr=127.0.0.1:0",
                "--allow-private-upstreams",
                "--drain-secs=2",
                "--log-format=json",
            ])
            .arg(format!("--allow-upstream={provider_url}"))
            // The most talkative level, str0m included: if a secret can leak, it leaks here.
            .env("RUST_LOG", "trace")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn realtime-relay");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Relay { child, log }
    }

    fn wait_for_log(&self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let log = self.log.lock().unwrap().clone();
            if let Some(line) = log.lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn grpc_url(&self) -> String {
        let line = self.wait_for_log("relay listening", Duration::from_secs(10));
        let v: serde_json::Value = serde_json::from_str(&line).expect("json log line");
        format!("http://{}", v["grpc_addr"].as_str().expect("grpc_addr"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_carry_no_key_and_no_sdp_and_sigterm_drains() {
    let provider = MockProvider::start(ProviderConfig::local(Some(UPSTREAM_KEY)))
        .await
        .unwrap();
    let mut relay = Relay::spawn(&provider.base_url());
    let mut grpc = RelayServiceClient::connect(relay.grpc_url()).await.unwrap();

    let (client, offer) = TestClient::new(ClientConfig::default()).unwrap();
    let resp = grpc
        .create_call(v1::CreateCallRequest {
            model: "gpt-realtime".into(),
            sdp_offer: offer.clone(),
            upstream: Some(v1::Upstream {
                base_url: provider.base_url(),
                authorization: format!("Bearer {UPSTREAM_KEY}"),
                worker_id: "w1".into(),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let Some(v1::create_call_response::Outcome::SdpAnswer(answer)) = resp.outcome else {
        panic!("no answer: {:?}", resp.outcome);
    };
    let mut client = client.connect(&answer).await.unwrap();
    client
        .wait_for_event_type("session.created", Duration::from_secs(10))
        .await
        .unwrap();
    client.send_text(r#"{"type":"x"}"#).await.unwrap();
    client
        .send_audio(10, Duration::from_millis(20))
        .await
        .unwrap();
    // A refused request with a key in it must not echo the key either.
    let _ = grpc
        .create_call(v1::CreateCallRequest {
            model: "m".into(),
            sdp_offer: "garbage".into(),
            upstream: Some(v1::Upstream {
                base_url: "http://10.9.9.9:1".into(),
                authorization: format!("Bearer {UPSTREAM_KEY}"),
                worker_id: "w1".into(),
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();

    // SIGTERM with a live call: it drains for --drain-secs, then ends the call and exits 0.
    let pid = relay.child.id() as libc_pid;
    let started = Instant::now();
    // SAFETY: plain kill(2) on the child we spawned.
    unsafe { kill(pid, 15) };
    let status = loop {
        if let Some(s) = relay.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "relay did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "the live call got its drain time"
    );
    assert!(
        client.wait_closed(Duration::from_secs(5)).await,
        "the live call was ended"
    );
    assert!(
        provider
            .wait_for_active_calls(0, Duration::from_secs(5))
            .await
    );

    let log = relay.log.lock().unwrap().clone();
    assert!(
        log.contains("call set up"),
        "the log is being captured:\n{log:.2000}"
    );
    assert!(log.contains(r#""reason":"drain""#), "{log:.4000}");
    assert!(!log.contains(UPSTREAM_KEY), "a key leaked into the log");
    assert!(
        !log.contains("sk-test"),
        "part of a key leaked into the log"
    );
    assert!(
        !log.contains("a=fingerprint"),
        "raw SDP leaked into the log"
    );
    assert!(
        !log.contains("a=ice-pwd"),
        "ICE credentials leaked into the log"
    );
}

#[allow(non_camel_case_types)]
type libc_pid = i32;
extern "C" {
    fn kill(pid: libc_pid, sig: i32) -> i32;
}

/// `relayctl` against a live relay: reflection lists the services, health is SERVING,
/// a call created from an SDP file (for a principal, which then owns it) shows up in `list`
/// with its owner, and `get` and `hangup`, which act as an operator, see and end it. The
/// principal reaches the relay's log at debug level only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayctl_drives_the_relay_through_grpc_and_reflection() {
    let provider = MockProvider::start(ProviderConfig::local(Some(UPSTREAM_KEY)))
        .await
        .unwrap();
    let relay = Relay::spawn(&provider.base_url());
    let url = relay.grpc_url();
    let ctl = |args: &[&str]| -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_relayctl"))
            .arg(format!("--relay={url}"))
            .args(args)
            .env("TEST_UPSTREAM_KEY", UPSTREAM_KEY)
            .output()
            .expect("run relayctl");
        assert!(
            out.status.success(),
            "relayctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON output")
    };
    let services = ctl(&["services"]);
    let names: Vec<&str> = services["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        names.contains(&realtime_relay_proto::SERVICE_NAME),
        "{names:?}"
    );
    assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
    assert_eq!(ctl(&["health"])["status"], "SERVING");

    // A watcher from the start: the first call's life, one JSON object per line.
    let watch = std::process::Command::new(env!("CARGO_BIN_EXE_relayctl"))
        .arg(format!("--relay={url}"))
        .args(["watch", "--count=3"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run relayctl watch");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (client, offer) = TestClient::new(ClientConfig::default()).unwrap();
    let offer_file =
        std::env::temp_dir().join(format!("relayctl-offer-{}.sdp", std::process::id()));
    std::fs::write(&offer_file, offer).unwrap();
    let created = ctl(&[
        "create",
        &format!("--offer={}", offer_file.display()),
        "--model=gpt-realtime",
        &format!("--upstream={}", provider.base_url()),
        "--api-key-env=TEST_UPSTREAM_KEY",
        &format!("--principal={PRINCIPAL}"),
    ]);
    let _ = std::fs::remove_file(&offer_file);
    let call_id = created["call_id"].as_str().unwrap().to_string();
    let client = client
        .connect(created["sdp_answer"].as_str().unwrap())
        .await
        .unwrap();
    let list = ctl(&["list"]);
    assert_eq!(list["live_calls_by_worker"]["cli"], 1);
    assert_eq!(
        list["live_usage_by_principal"][PRINCIPAL]["live_calls"], 1,
        "{list}"
    );
    assert_eq!(list["calls"][0]["principal"], PRINCIPAL);
    let got = ctl(&["get", &call_id]);
    assert_eq!(got["call_id"], call_id.as_str());
    assert_eq!(got["principal"], PRINCIPAL, "operators see the owner");
    let ended = ctl(&["hangup", &call_id]);
    assert_eq!(ended["state"], "CALL_STATE_ENDED");
    assert_eq!(ended["end_reason"], "hangup");
    assert_eq!(ended["principal"], PRINCIPAL);
    assert!(client.wait_closed(Duration::from_secs(5)).await);
    let out = tokio::task::spawn_blocking(move || watch.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success());
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["created", "connected", "ended"], "{events:?}");
    assert!(events
        .iter()
        .all(|e| e["call"]["call_id"] == call_id.as_str()));
    assert_eq!(events[2]["call"]["end_reason"], "hangup");
    assert_eq!(events[2]["call"]["usage"]["partial"], false);

    // A GPT-Live call by hand: a live_ id, the Live exchange upstream, session.started.
    let (client, offer) = TestClient::new(ClientConfig::default()).unwrap();
    std::fs::write(&offer_file, offer).unwrap();
    let created = ctl(&[
        "create",
        "--api=live",
        &format!("--offer={}", offer_file.display()),
        "--model=gpt-live-1",
        r#"--session={"instructions":"be brief"}"#,
        &format!("--upstream={}", provider.base_url()),
        "--api-key-env=TEST_UPSTREAM_KEY",
    ]);
    let _ = std::fs::remove_file(&offer_file);
    let live_id = created["call_id"].as_str().unwrap().to_string();
    assert!(live_id.starts_with("live_"), "{live_id}");
    let upstream = provider.requests().pop().unwrap();
    assert_eq!(upstream.path, "/v1/live/sessions");
    assert_eq!(
        upstream.session,
        Some(serde_json::json!({"model": "gpt-live-1", "instructions": "be brief"}))
    );
    let mut client = client
        .connect(created["sdp_answer"].as_str().unwrap())
        .await
        .unwrap();
    client
        .wait_for_event_type("session.started", Duration::from_secs(10))
        .await
        .unwrap();
    let ended = ctl(&["hangup", &live_id]);
    assert_eq!(ended["end_reason"], "hangup");
    client
        .wait_for_event_type("session.closed", Duration::from_secs(5))
        .await
        .unwrap();

    // The call.usage record of the first call: one JSON object with flat fields, the owner
    // named by a hash only.
    let record = relay.wait_for_log("\"call.usage\"", Duration::from_secs(5));
    let record: serde_json::Value = record
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["target"] == "call.usage" && v["call_id"] == call_id.as_str())
        .expect("the call.usage record of the first call");
    assert_eq!(record["end_reason"], "hangup");
    assert_eq!(record["api"], "realtime");
    assert_eq!(record["tokens_total"], 0);
    assert_eq!(
        record["principal_hash"].as_str().map(str::len),
        Some(16),
        "{record}"
    );

    // The relay logs at trace: the principal is in its debug lines, never above.
    relay.wait_for_log(PRINCIPAL, Duration::from_secs(5));
    let log = relay.log.lock().unwrap().clone();
    for line in log.lines().filter(|l| l.contains(PRINCIPAL)) {
        let v: serde_json::Value = serde_json::from_str(line).expect("json log line");
        assert!(
            matches!(v["level"].as_str(), Some("DEBUG" | "TRACE")),
            "the principal in a line above debug: {line}"
        );
    }
}

/// An owner as the filter would name one (a hash, never a credential).
const PRINCIPAL: &str = "p_0c7f3e1d9a2b4c6e8f0a1b2c3d4e5f60";
