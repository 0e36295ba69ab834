//! A call's setup against the caller's deadline, over real gRPC and real TCP on loopback: the
//! relay answers `upstream_timeout` itself before the caller's `grpc-timeout` runs out, and a
//! call set up after its caller left is ended and hung up at the provider.

mod common;

use common::{metric, Harness, UPSTREAM_KEY};
use echo_model::{ClientConfig, MockProvider, ProviderConfig, TestClient};
use realtime_relay_proto::v1::relay_service_client::RelayServiceClient;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;

/// Accepts connections, reads whatever comes, and never answers.
async fn silent_provider() -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf).await;
            held.push(conn);
        }
    });
    (url, task)
}

/// A provider that answers `delay` late: forwards each HTTP request to `target` after the
/// delay and copies the answer back.
async fn slow_provider(target: String, delay: Duration) -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let target = target.trim_start_matches("http://").to_string();
    let task = tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                let request = read_http_request(&mut conn).await;
                tokio::time::sleep(delay).await;
                let mut up = TcpStream::connect(&target).await.unwrap();
                up.write_all(&request).await.unwrap();
                let mut answer = Vec::new();
                let _ = up.read_to_end(&mut answer).await;
                let _ = conn.write_all(&answer).await;
            });
        }
    });
    (url, task)
}

/// One HTTP/1.1 request (headers and a Content-Length body), with `connection: close` so the
/// answer ends with the connection.
async fn read_http_request(conn: &mut TcpStream) -> Vec<u8> {
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = conn.read(&mut buf).await.unwrap();
        assert!(n > 0, "the request ended early");
        data.extend_from_slice(&buf[..n]);
        let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&data[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0);
        if data.len() >= end + 4 + length {
            let head = String::from_utf8_lossy(&data[..end]).to_string();
            let mut out: Vec<u8> = head
                .lines()
                .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
                .flat_map(|l| format!("{l}\r\n").into_bytes())
                .collect();
            out.extend_from_slice(b"connection: close\r\n\r\n");
            out.extend_from_slice(&data[end + 4..]);
            return out;
        }
    }
}

/// A provider that takes TCP and never answers: the caller's deadline is 2 s, so the relay
/// answers `upstream_timeout` (DEADLINE_EXCEEDED with the code) by 1.8 s, and counts the
/// worker's failure. Before, the relay waited its own 10 s upstream timeout and tonic cut the
/// request at 2 s with a bare CANCELLED: no code, no worker failure, no ejection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_never_answers_gets_upstream_timeout_within_the_callers_deadline() {
    let (url, _silent) = silent_provider().await;
    let allow = format!("--allow-upstream={url}");
    let mut h = Harness::start(&[allow.as_str()]).await;
    let (_client, offer) = TestClient::new(ClientConfig::default()).unwrap();
    let mut req = h.request(&offer, "gpt-realtime", "");
    req.upstream.as_mut().unwrap().base_url = url.clone();
    let mut request = tonic::Request::new(req);
    request.set_timeout(Duration::from_secs(2));
    let started = Instant::now();
    let status = h.grpc.create_call(request).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().starts_with("upstream_timeout"),
        "{status:?}"
    );
    assert!(
        took >= Duration::from_millis(1_700) && took < Duration::from_millis(2_000),
        "answered after {took:?}"
    );
    let text = h.metrics_text().await;
    assert_eq!(
        metric(&text, "realtime_relay_worker_failures_total{worker=\"w1\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "realtime_relay_setup_failures_total{reason=\"upstream_timeout\"}"
        ),
        1.0
    );
}

/// The caller leaves while the provider is still answering (the filter cancels a create whose
/// client went away): the relay finishes the setup on its own, then ends the call it can give to
/// nobody and hangs it up at the provider, instead of dropping the exchange half way and leaving
/// the provider's call open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_set_up_after_its_caller_left_is_ended_and_hung_up_at_the_provider() {
    let provider = MockProvider::start(ProviderConfig::local(Some(UPSTREAM_KEY)))
        .await
        .unwrap();
    let (url, _slow) = slow_provider(provider.base_url(), Duration::from_millis(800)).await;
    let relay = relay_service::server::start(&common::relay_args(&url, &[]))
        .await
        .unwrap();
    let grpc = RelayServiceClient::connect(format!("http://{}", relay.grpc_addr))
        .await
        .unwrap();
    let mut h = Harness {
        provider,
        relay,
        grpc,
    };
    let (_client, offer) = TestClient::new(ClientConfig::default()).unwrap();
    let mut req = h.request(&offer, "gpt-realtime", "");
    req.upstream.as_mut().unwrap().base_url = url.clone();
    // The caller gives up after 200 ms: its request is cancelled (HTTP/2 RST_STREAM).
    let gave_up = tokio::time::timeout(Duration::from_millis(200), h.grpc.create_call(req)).await;
    assert!(gave_up.is_err(), "the setup cannot be done in 200 ms");
    // The setup completes at the provider about 800 ms in; the relay then ends the call.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut text = String::new();
    while Instant::now() < deadline {
        text = h.metrics_text().await;
        // The series exists once a call ended for that reason.
        if text.contains("realtime_relay_calls_ended_total{reason=\"abandoned\"}") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metric(
            &text,
            "realtime_relay_calls_ended_total{reason=\"abandoned\"}"
        ),
        1.0,
        "{text}"
    );
    assert_eq!(metric(&text, "realtime_relay_calls_active"), 0.0);
    // The provider got the offer and, after it, the hangup for the call it created.
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.provider.hangups().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(h.provider.requests().len(), 1);
    assert_eq!(
        h.provider.hangups().len(),
        1,
        "the provider's call was hung up"
    );
    assert!(
        h.provider
            .wait_for_active_calls(0, Duration::from_secs(5))
            .await
    );
}
