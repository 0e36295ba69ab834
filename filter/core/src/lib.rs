//! Host-free logic of the realtime Envoy filter.
//!
//! Nothing here calls proxy-wasm: the `realtime-filter` crate feeds headers, bodies, gRPC
//! answers, time and random bytes in, and sends out what these functions return. A request's
//! life: [`classify`] → [`check_create_headers`] → body buffered → [`validate_create_body`] →
//! [`plan_create`] (worker, key, gRPC message) → relay → [`relay::map_create_response`].
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![deny(clippy::indexing_slicing)]

pub mod classify;
pub mod config;
pub mod content_type;
pub mod error;
pub mod keys;
pub mod model;
pub mod multipart;
pub mod relay;
pub mod replica;
pub mod routing;
pub mod sdp;

pub use classify::{classify, Route};
pub use config::{Config, ConfigError};
pub use content_type::BodyKind;
pub use error::FilterError;

use keys::KeySource;
use model::ResolvedModel;
use routing::{Choice, SharedStore};

/// A reply the filter sends itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Checks a call-creation request before its body arrives: body form and declared size.
pub fn check_create_headers(
    config: &Config,
    content_type: Option<&str>,
    content_length: Option<&str>,
) -> Result<BodyKind, FilterError> {
    if let Some(len) = content_length {
        // Envoy has validated the number; an absurd one is still too large.
        let too_large = len.trim().parse::<u64>().map_or(true, |n| {
            n > u64::try_from(config.max_body_bytes).unwrap_or(u64::MAX)
        });
        if too_large {
            return Err(FilterError::BodyTooLarge {
                limit: config.max_body_bytes,
            });
        }
    }
    content_type::parse(content_type)
}

/// A validated offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub sdp: String,
    /// The session part as sent (a JSON object), or empty.
    pub session_json: String,
    pub model: ResolvedModel,
}

/// Validates the buffered body: structure, SDP, session JSON, model.
pub fn validate_create_body(
    config: &Config,
    kind: &BodyKind,
    query: Option<&str>,
    body: &[u8],
) -> Result<Offer, FilterError> {
    if body.len() > config.max_body_bytes {
        return Err(FilterError::BodyTooLarge {
            limit: config.max_body_bytes,
        });
    }
    let (sdp_bytes, session) = match kind {
        BodyKind::Sdp => (body, None),
        BodyKind::Multipart { boundary } => {
            let p = multipart::parse(
                body,
                boundary,
                config.max_sdp_bytes,
                config.max_session_bytes,
            )?;
            (p.sdp, p.session)
        }
    };
    let sdp = sdp::validate_offer(sdp_bytes, config.max_sdp_bytes)?;
    let (session_json, session_model) = match session {
        None => (String::new(), None),
        Some(raw) => {
            let text = std::str::from_utf8(raw)
                .map_err(|_| FilterError::InvalidSessionJson("not UTF-8"))?;
            let value: serde_json::Value = serde_json::from_str(text)
                .map_err(|_| FilterError::InvalidSessionJson("not valid JSON"))?;
            let obj = value
                .as_object()
                .ok_or(FilterError::InvalidSessionJson("not a JSON object"))?;
            (text.trim().to_string(), model::session_model(obj)?)
        }
    };
    let from_query = model::query_model(query)?;
    let model = model::resolve(config, session_model.as_deref(), from_query.as_deref())?;
    Ok(Offer {
        sdp: sdp.to_string(),
        session_json,
        model,
    })
}

/// Everything needed to dispatch `CreateCall`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub call_id: String,
    /// The relay cluster to dispatch to.
    pub cluster: String,
    /// The relay replica chosen (index into `Config::replicas`), when there are replicas.
    pub replica: Option<usize>,
    pub choice: Choice,
    pub worker_id: String,
    pub key_source: KeySource,
    /// Encoded `CreateCallRequest` (holds the key: never log it).
    pub message: Vec<u8>,
}

/// Picks the worker (counting one outstanding call on it), resolves the key and builds the
/// gRPC message. On error nothing stays counted.
#[allow(clippy::too_many_arguments)]
pub fn plan_create(
    config: &Config,
    offer: &Offer,
    authorization: Option<&str>,
    routing_value: Option<&str>,
    store: &dyn SharedStore,
    now_ms: u64,
    call_random: &[u8; 16],
    request_id: &str,
) -> Result<Plan, FilterError> {
    let choice = routing::pick(config, offer.model.index, routing_value, store, now_ms)?;
    let (Some(pool), Some(worker), Some(model)) = (
        choice.pool(config),
        choice.worker(config),
        config.models.get(offer.model.index),
    ) else {
        return Err(FilterError::Internal);
    };
    let (auth, key_source) =
        match keys::upstream_authorization(pool.key_policy, authorization, worker.key.as_ref()) {
            Ok(v) => v,
            Err(e) => {
                routing::release(store, &worker.id);
                return Err(e);
            }
        };
    let replica = replica::pick(config, store, now_ms, &[]);
    let (cluster, replica_id) = match replica.and_then(|i| config.replicas.get(i)) {
        Some(r) => (r.cluster.clone(), Some(r.id.as_str())),
        None => (config.relay_cluster.clone(), None),
    };
    let call_id = replica::call_id(call_random, replica_id);
    let upstream_model = worker.upstream_model.as_deref().unwrap_or(&model.name);
    let message = relay::encode_create(&relay::CreateCall {
        call_id: &call_id,
        request_id,
        model: &offer.model.requested,
        upstream_model,
        sdp_offer: &offer.sdp,
        session_json: &offer.session_json,
        base_url: &worker.base_url,
        authorization: &auth,
        worker_id: &worker.id,
    });
    Ok(Plan {
        call_id,
        cluster,
        replica,
        choice,
        worker_id: worker.id.clone(),
        key_source,
        message,
    })
}

#[cfg(test)]
mod table;
