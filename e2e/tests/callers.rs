//! Who calls, through the real Envoy: a JWT principal that Envoy's own `jwt_authn` filter
//! verified (this test makes its own JWKS and signs its own tokens), operator keys, a
//! stranger's hangup, and no credential in Envoy's or the relay's logs.

mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use common::*;
use e2e::Paths;
use hmac::{Hmac, KeyInit, Mac};
use serde_json::json;
use sha2::Sha256;

/// The JWKS secret (an HS256 `oct` key) the test signs its tokens with.
const JWT_SECRET: &[u8] = b"e2e-jwt-signing-secret-0123456789abcdef";
const ISSUER: &str = "https://issuer.e2e.test";

/// A compact HS256 JWT for `sub`, valid for an hour (or signed with `secret`).
fn jwt(sub: &str, secret: &[u8]) -> String {
    let header = URL_SAFE_NO_PAD.encode(json!({"alg": "HS256", "typ": "JWT"}).to_string());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let payload = URL_SAFE_NO_PAD
        .encode(json!({"iss": ISSUER, "sub": sub, "iat": now, "exp": now + 3600}).to_string());
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(format!("{header}.{payload}").as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{header}.{payload}.{sig}")
}

/// Envoy's JWT filter ahead of the Wasm filter. A token that verifies puts its payload in
/// dynamic metadata (`payload_in_metadata`), where the Wasm filter reads the principal: a
/// client can forge a header, not metadata. Anything else passes on
/// (`allow_missing_or_failed`) and the filter judges it like any other `Authorization`: an
/// operator API key sent as `Bearer` is no JWT, and must reach the filter; a forged JWT is
/// then an unknown key.
fn jwt_filter_patch() -> (String, String) {
    let jwks =
        json!({"keys": [{"kty": "oct", "alg": "HS256", "k": URL_SAFE_NO_PAD.encode(JWT_SECRET)}]})
            .to_string();
    let anchor = "                  - name: envoy.filters.http.wasm\n";
    let filter = format!(
        r#"                  - name: envoy.filters.http.jwt_authn
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication
                      providers:
                        e2e:
                          issuer: "{ISSUER}"
                          local_jwks:
                            inline_string: '{jwks}'
                          payload_in_metadata: jwt_payload
                          forward: false
                      rules:
                        - match: {{ prefix: "/" }}
                          requires:
                            requires_any:
                              requirements:
                                - provider_name: e2e
                                - allow_missing_or_failed: {{}}
"#
    );
    (anchor.to_string(), format!("{filter}{anchor}"))
}

/// One model served by the echo-model mock, in a pool that lends its worker key to JWT
/// principals and the operator key only (no anonymous caller).
fn jwt_gateway(rt: &tokio::runtime::Runtime, name: &str) -> (Gateway, echo_model::MockProvider) {
    let p = provider(rt, KEY);
    let config = plugin_config(
        json!([{ "name": "gpt-realtime", "pools": ["main"] }]),
        json!([{ "name": "main", "key_policy": "replace", "callers": ["jwt", "api_key"],
                 "workers": [{ "id": "w1", "base_url": p.base_url(), "key_env": "OPENAI_API_KEY" }] }]),
        json!({ "callers": {
            "api_keys": callers_section()["api_keys"],
            "jwt": { "payload_key": "jwt_payload" }
        }}),
    );
    let g = gateway_with(name, &[p.base_url()], config, vec![jwt_filter_patch()]);
    (g, p)
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[test]
fn a_principal_envoys_jwt_filter_verified_calls_and_owns_its_calls() {
    let rt = runtime();
    let (g, p) = jwt_gateway(&rt, "callers-jwt");
    let alice = bearer(&jwt("alice@example.test", JWT_SECRET));
    let bob = bearer(&jwt("bob@example.test", JWT_SECRET));

    // Alice (verified by Envoy, read by the filter from dynamic metadata) calls.
    let (c, offer) = new_client();
    let r = post_sdp(&g.envoy, CALLS, &offer, &[("authorization", &alice)]);
    let id = created(&r);
    let client = exercise(&rt, c, &r.text());
    // The JWT went nowhere upstream: the worker key replaced it.
    let reqs = p.requests();
    assert_eq!(
        reqs[0].authorization.as_deref(),
        Some(format!("Bearer {KEY}").as_str())
    );

    // Nobody else ends her call: not anonymous, not Bob. Both get 404, as for an unknown id.
    let unknown = "rtc_0123456789abcdef0123456789abcdef";
    let stranger = hangup_as(&g.envoy, &id, &bob);
    assert_eq!(stranger.status, 404, "{}", stranger.text());
    assert_eq!(
        stranger.json().unwrap()["error"],
        hangup_as(&g.envoy, unknown, &bob).json().unwrap()["error"],
        "a stranger cannot tell her call from an unknown one"
    );
    let anonymous = hangup(&g.envoy, &id);
    assert_eq!(anonymous.status, 401, "{}", anonymous.text());
    assert_eq!(
        anonymous.json().unwrap()["error"]["code"],
        "missing_api_key"
    );
    // Still up: media flows after the refused hangups.
    let mut client = client;
    rt.block_on(async {
        client
            .send_text(r#"{"type":"conversation.item.create","event_id":"after-refusals"}"#)
            .await
            .unwrap();
        let back = client
            .wait_for_event_type("conversation.item.create", T)
            .await
            .expect("events still flow after the refused hangups");
        assert_eq!(back["event_id"], "after-refusals");
    });
    // She ends it.
    assert_eq!(hangup_as(&g.envoy, &id, &alice).status, 200);

    // No token: this pool admits no anonymous caller. 401, nothing reaches the relay.
    let (_c, offer) = new_client();
    let r = post_sdp(&g.envoy, CALLS, &offer, &[]);
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.json().unwrap()["error"]["code"], "missing_api_key");
    // A token Envoy cannot verify: Envoy's own 401, in OpenAI's shape (local_reply_config).
    let forged = bearer(&jwt(
        "alice@example.test",
        b"someone-elses-secret-0123456789abcdef",
    ));
    let r = post_sdp(&g.envoy, CALLS, &offer, &[("authorization", &forged)]);
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(
        r.json().unwrap()["error"]["code"].is_string(),
        "{}",
        r.text()
    );
    // A forged principal header is nothing to the filter (it reads metadata, not headers).
    let r = post_sdp(
        &g.envoy,
        CALLS,
        &offer,
        &[("x-jwt-payload", "{\"sub\":\"alice@example.test\"}")],
    );
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(
        p.requests().len(),
        1,
        "only Alice's create reached the provider"
    );

    // The operator ends anyone's call.
    let (c, offer) = new_client();
    let r = post_sdp(&g.envoy, CALLS, &offer, &[("authorization", &bob)]);
    let bobs = created(&r);
    let _bob_client = exercise(&rt, c, &r.text());
    assert_eq!(hangup_as(&g.envoy, &bobs, ops_auth().1).status, 200);

    // No credential in either log.
    let envoy_log = g.envoy.log_text();
    let relay_log = g.relay.log_text();
    for secret in [alice.as_str(), bob.as_str(), OPS_KEY, KEY] {
        let token = secret.trim_start_matches("Bearer ");
        assert!(!envoy_log.contains(token), "a credential in Envoy's log");
        assert!(
            !relay_log.contains(token),
            "a credential in the relay's log"
        );
    }
}

/// The number of connections Envoy worker thread `n` accepted on the listener.
fn worker_connections(envoy: &e2e::Envoy, n: usize) -> f64 {
    let text = e2e::http::get(envoy.admin(), "/stats?filter=worker_")
        .unwrap()
        .text();
    text.lines()
        .filter(|l| {
            l.starts_with("listener.") && l.contains(&format!(".worker_{n}.downstream_cx_total:"))
        })
        .filter_map(|l| l.rsplit(':').next()?.trim().parse::<f64>().ok())
        .sum()
}

/// Per-caller limits hold across Envoy's two worker threads (`--concurrency 2`: every e2e
/// Envoy runs so): a principal's third live call is refused on whichever thread it lands, and
/// its hangup makes room again.
#[test]
fn concurrent_calls_per_caller_hold_across_envoys_worker_threads() {
    let rt = runtime();
    let p = provider(&rt, KEY);
    let config = plugin_config(
        json!([{ "name": "gpt-realtime", "pools": ["main"] }]),
        json!([{ "name": "main", "key_policy": "replace", "callers": ["api_key"],
                 "limits": { "calls_per_caller": 2 },
                 "workers": [{ "id": "w1", "base_url": p.base_url(), "key_env": "OPENAI_API_KEY" }] }]),
        json!({}),
    );
    let g = gateway("callers-limits", &[p.base_url()], config);
    let ops = ops_auth();
    let mut live = Vec::new();
    for _ in 0..2 {
        let (_c, offer) = new_client();
        live.push(created(&post_sdp(&g.envoy, CALLS, &offer, &[ops])));
    }
    // More creates, each on a new connection, until both worker threads have taken some:
    // every one is refused, whichever thread counted the first two.
    let mut refused = 0;
    for _ in 0..40 {
        let (_c, offer) = new_client();
        let r = post_sdp(&g.envoy, CALLS, &offer, &[ops]);
        assert_eq!(r.status, 429, "{}", r.text());
        let json = r.json().unwrap();
        assert_eq!(json["error"]["code"], "rate_limit_exceeded");
        assert_eq!(json["error"]["type"], "rate_limit_error");
        assert!(r.header("retry-after").is_some());
        refused += 1;
        if refused >= 4
            && worker_connections(&g.envoy, 0) > 0.0
            && worker_connections(&g.envoy, 1) > 0.0
        {
            break;
        }
    }
    assert!(
        worker_connections(&g.envoy, 0) > 0.0 && worker_connections(&g.envoy, 1) > 0.0,
        "both worker threads took connections"
    );
    assert_eq!(p.requests().len(), 2, "refused creates reach no provider");
    // One ends: room for one more.
    assert_eq!(hangup_as(&g.envoy, &live[0], ops.1).status, 200);
    let (_c, offer) = new_client();
    let third = created(&post_sdp(&g.envoy, CALLS, &offer, &[ops]));
    for id in [&live[1], &third] {
        assert_eq!(hangup_as(&g.envoy, id, ops.1).status, 200);
    }
}

/// A global rate-limit service as Envoy's API defines it (envoyproxy/ratelimit stands here):
/// `limit` creations per principal, counted over the whole test, and the requests it got.
mod fake_rls {
    use realtime_relay_proto::rls::rate_limit_response::{Code, DescriptorStatus};
    use realtime_relay_proto::rls::rate_limit_service_server::{
        RateLimitService, RateLimitServiceServer,
    };
    use realtime_relay_proto::rls::{Duration, RateLimitRequest, RateLimitResponse};
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    pub struct Rls {
        pub limit: u32,
        pub seen: Arc<Mutex<Vec<RateLimitRequest>>>,
        pub counts: Arc<Mutex<HashMap<String, u32>>>,
    }

    #[tonic::async_trait]
    impl RateLimitService for Rls {
        async fn should_rate_limit(
            &self,
            request: tonic::Request<RateLimitRequest>,
        ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
            let req = request.into_inner();
            self.seen.lock().unwrap().push(req.clone());
            let principal = req
                .descriptors
                .first()
                .and_then(|d| d.entries.iter().find(|e| e.key == "principal"))
                .map(|e| e.value.clone())
                .unwrap_or_default();
            let mut counts = self.counts.lock().unwrap();
            let n = counts.entry(principal).or_default();
            *n += req.hits_addend.max(1);
            let code = if *n > self.limit {
                Code::OverLimit
            } else {
                Code::Ok
            };
            let mut r = RateLimitResponse::default();
            r.set_overall_code(code);
            let mut s = DescriptorStatus::default();
            s.set_code(code);
            s.duration_until_reset = Some(Duration {
                seconds: 17,
                nanos: 0,
            });
            r.statuses.push(s);
            Ok(tonic::Response::new(r))
        }
    }

    /// Serves `rls` on a loopback port (for the life of the runtime).
    pub fn start(rt: &tokio::runtime::Runtime, rls: Rls) -> u16 {
        // A free port, then the server on it (loopback: nobody else takes it in between).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        rt.spawn(async move {
            tonic::transport::Server::builder()
                .add_service(RateLimitServiceServer::new(rls))
                .serve(addr)
                .await
                .unwrap();
        });
        port
    }
}

/// Fleet-wide limits: the filter asks a global rate-limit service before each create, with
/// descriptors keyed by the caller's principal (a hash, never a credential); over the service's
/// limit the caller gets 429 with the service's Retry-After, and other callers are not affected.
#[test]
fn a_global_rate_limit_service_keyed_by_principal_caps_a_caller_fleet_wide() {
    // The shipped example configures the same domain and descriptor keys.
    let example = std::fs::read_to_string(
        Paths::discover()
            .root
            .join("examples/ratelimit/config.yaml"),
    )
    .expect("examples/ratelimit/config.yaml");
    for want in ["domain: realtime", "key: principal", "key: model"] {
        assert!(example.contains(want), "the example lacks {want}");
    }
    let rt = runtime();
    let p = provider(&rt, KEY);
    let rls = fake_rls::Rls {
        limit: 2,
        ..Default::default()
    };
    let rls_port = fake_rls::start(&rt, rls.clone());
    let config = plugin_config(
        json!([{ "name": "gpt-realtime", "pools": ["main"] }]),
        json!([{ "name": "main", "key_policy": "replace", "callers": ["jwt", "api_key"],
                 "workers": [{ "id": "w1", "base_url": p.base_url(), "key_env": "OPENAI_API_KEY" }] }]),
        json!({
            "callers": { "api_keys": callers_section()["api_keys"], "jwt": { "payload_key": "jwt_payload" } },
            "global_rate_limit": { "cluster": "ratelimit", "domain": "realtime", "timeout_ms": 1000 }
        }),
    );
    let cluster = format!(
        r#"    - name: ratelimit
      type: STATIC
      connect_timeout: 0.25s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options: {{}}
      load_assignment:
        cluster_name: ratelimit
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {{ address: 127.0.0.1, port_value: {rls_port} }}
"#
    );
    let anchor = "    # The relay's gRPC endpoint.";
    let g = gateway_with(
        "callers-global-limit",
        &[p.base_url()],
        config,
        vec![
            jwt_filter_patch(),
            (anchor.to_string(), format!("{cluster}{anchor}")),
        ],
    );
    let alice = bearer(&jwt("alice@example.test", JWT_SECRET));
    let bob = bearer(&jwt("bob@example.test", JWT_SECRET));
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (_c, offer) = new_client();
        ids.push(created(&post_sdp(
            &g.envoy,
            CALLS,
            &offer,
            &[("authorization", &alice)],
        )));
    }
    let (_c, offer) = new_client();
    let r = post_sdp(&g.envoy, CALLS, &offer, &[("authorization", &alice)]);
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json().unwrap()["error"]["code"], "rate_limit_exceeded");
    assert_eq!(r.header("retry-after"), Some("17"));
    // Bob has his own budget.
    let (_c, offer) = new_client();
    ids.push(created(&post_sdp(
        &g.envoy,
        CALLS,
        &offer,
        &[("authorization", &bob)],
    )));
    assert_eq!(
        p.requests().len(),
        3,
        "the refused create reached no provider"
    );
    // The service saw principals (hashes), never a token, and the model.
    let seen = rls.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 4);
    for req in &seen {
        assert_eq!(req.domain, "realtime");
        let text = format!("{req:?}");
        assert!(
            text.contains("p_") && text.contains("gpt-realtime"),
            "{text}"
        );
        assert!(!text.contains("alice") && !text.contains(alice.trim_start_matches("Bearer ")));
    }
    for id in &ids {
        assert_eq!(hangup_as(&g.envoy, id, ops_auth().1).status, 200);
    }
}
