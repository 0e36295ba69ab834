//! The sideband: an application server attaches to a call it set up, over a WebSocket, to
//! follow and steer it (OpenAI's Realtime `GET /v1/realtime?call_id=rtc_…` and GPT-Live
//! `GET /v1/live/sessions/{id}/attach`). Through the gateway the server knows only the
//! gateway's id; the provider's id and the worker are the relay's. So the filter pauses the
//! upgrade request, asks the relay (`GetCall`, as the caller: only the call's owner or an
//! operator gets an answer; anyone else gets 404 as for an unknown id), and rewrites the
//! request for the worker: the path names the provider's id, `:authority` the worker's host,
//! `authorization` the key the call's pool lends (or the caller's own provider key where the
//! pool passes it through), and [`CLUSTER_HEADER`] the worker's Envoy cluster
//! (`workers[].cluster`), which the sideband route reads (`cluster_header`). Envoy then carries
//! the WebSocket upgrade to the worker; nothing of it crosses the relay.
//!
//! [`CLUSTER_HEADER`] steers the router, so a client must never set it: the filter removes it
//! from every request it sees, before anything else.

use crate::config::{Config, Pool, Worker};
use crate::error::FilterError;
use crate::identity::Caller;
use realtime_relay_proto::call_id::Kind;
use realtime_relay_proto::v1::{CallInfo, CallState};

/// The Realtime sideband's path (`GET {path}?call_id=…`).
pub const DEFAULT_PATH: &str = "/v1/realtime";

/// The request header naming the Envoy cluster a sideband goes to (the sideband route's
/// `cluster_header`). Set by the filter only.
pub const CLUSTER_HEADER: &str = "x-realtime-sideband-cluster";

/// An Envoy cluster name as the configuration may give it (Istio's look like
/// `outbound|443||api.openai.com`).
pub fn valid_cluster_name(name: &str) -> bool {
    (1..=255).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'|' | b':'))
}

/// How the upgrade request leaves for the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    pub path: String,
    pub authority: String,
    pub authorization: String,
    pub cluster: String,
}

/// `base_url` split into `host[:port]` and its path prefix (no trailing `/`).
fn split_base(base_url: &str) -> Option<(&str, &str)> {
    let rest = base_url
        .strip_prefix("https://")
        .or_else(|| base_url.strip_prefix("http://"))?;
    Some(match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    })
}

/// The worker (and its pool) a call runs on, by the id the relay reports.
fn worker_of<'c>(config: &'c Config, worker_id: &str) -> Option<(&'c Pool, &'c Worker)> {
    config
        .pools
        .iter()
        .find_map(|p| p.workers.iter().find(|w| w.id == worker_id).map(|w| (p, w)))
}

/// The rewrite of a sideband request for the call `info` (the relay's answer to the caller's
/// `GetCall`), of API `kind`, asked by `caller` with `client_authorization`.
pub fn plan(
    config: &Config,
    info: &CallInfo,
    kind: Kind,
    caller: &Caller,
    client_authorization: Option<&str>,
) -> Result<Rewrite, FilterError> {
    if info.state == CallState::Ended as i32 {
        return Err(FilterError::CallNotFound);
    }
    let upstream_id = info.upstream_call_id.as_str();
    // The id goes into the path: only the grammar the relay accepted from the provider.
    if upstream_id.is_empty()
        || upstream_id.len() > 128
        || !upstream_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(FilterError::SidebandUnavailable(
            "the provider gave the call no id",
        ));
    }
    let (pool, worker) = worker_of(config, &info.worker_id).ok_or(
        FilterError::SidebandUnavailable("its worker is no longer configured"),
    )?;
    let cluster = worker
        .cluster
        .clone()
        .ok_or(FilterError::SidebandUnavailable(
            "its worker has no Envoy cluster (workers[].cluster)",
        ))?;
    let (authority, prefix) = split_base(&worker.base_url).ok_or(FilterError::Internal)?;
    let path = match kind {
        Kind::Realtime => format!("{prefix}/v1/realtime?call_id={upstream_id}"),
        Kind::Live => format!("{prefix}/v1/live/sessions/{upstream_id}/attach"),
    };
    let (authorization, _) =
        caller.upstream_authorization(pool, client_authorization, worker.key.as_ref())?;
    Ok(Rewrite {
        path,
        authority: authority.to_string(),
        authorization,
        cluster,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        let mut v: serde_json::Value = serde_json::from_str(crate::config::tests::SAMPLE).unwrap();
        v["pools"][0]["workers"][0]["cluster"] = serde_json::json!("outbound|443||api.example");
        v["pools"][0]["workers"][0]["base_url"] = serde_json::json!("https://api.example/openai");
        Config::from_json(v.to_string().as_bytes(), &crate::config::tests::env).unwrap()
    }

    fn info(worker: &str, upstream: &str, state: CallState) -> CallInfo {
        CallInfo {
            call_id: "rtc_gw".into(),
            worker_id: worker.into(),
            upstream_call_id: upstream.into(),
            state: state as i32,
            ..Default::default()
        }
    }

    #[test]
    fn a_sideband_goes_to_its_workers_cluster_under_the_providers_id_with_the_pools_key() {
        let c = config();
        let w = &c.pools[0].workers[0];
        let r = plan(
            &c,
            &info(&w.id, "rtc_provider1", CallState::Connected),
            Kind::Realtime,
            &Caller::Anonymous,
            None,
        )
        .unwrap();
        assert_eq!(r.path, "/openai/v1/realtime?call_id=rtc_provider1");
        assert_eq!(r.authority, "api.example");
        assert_eq!(r.cluster, "outbound|443||api.example");
        assert_eq!(r.authorization, w.key.as_ref().unwrap().bearer());
        let live = plan(
            &c,
            &info(&w.id, "live_p2", CallState::Pending),
            Kind::Live,
            &Caller::Anonymous,
            None,
        )
        .unwrap();
        assert_eq!(live.path, "/openai/v1/live/sessions/live_p2/attach");
    }

    #[test]
    fn ended_calls_odd_ids_and_workers_without_a_cluster_get_no_sideband() {
        let c = config();
        let w0 = c.pools[0].workers[0].id.clone();
        let no_cluster = c.pools[1].workers[0].id.clone();
        for (i, want) in [
            (info(&w0, "rtc_p", CallState::Ended), "call_not_found"),
            (info(&w0, "", CallState::Connected), "sideband_unavailable"),
            (
                info(&w0, "rtc_p/../x", CallState::Connected),
                "sideband_unavailable",
            ),
            (
                info("gone", "rtc_p", CallState::Connected),
                "sideband_unavailable",
            ),
            (
                info(&no_cluster, "rtc_p", CallState::Connected),
                "sideband_unavailable",
            ),
        ] {
            let e = plan(&c, &i, Kind::Realtime, &Caller::Anonymous, None).unwrap_err();
            assert_eq!(e.code(), want, "{i:?}");
        }
        assert!(valid_cluster_name("outbound|443||api.openai.com"));
        assert!(!valid_cluster_name("a b") && !valid_cluster_name(""));
    }
}
