//! Call creation before the relay: the headers checked, the buffered body validated into an
//! [`Offer`], and the [`Plan`] (worker, key, call id, gRPC message) made from it.

use crate::client_secrets;
use crate::config::Config;
use crate::content_type::{self, BodyKind};
use crate::ephemeral::Claims;
use crate::error::FilterError;
use crate::identity::Caller;
use crate::keys::KeySource;
use crate::model::{self, ResolvedModel};
use crate::routing::{self, Choice, SharedStore};
use crate::{multipart, relay, replica, sdp};

/// Checks a call-creation request before its body arrives: body form and declared size.
pub fn check_create_headers(
    config: &Config,
    content_type: Option<&str>,
    content_length: Option<&str>,
) -> Result<BodyKind, FilterError> {
    check_content_length(config, content_length)?;
    content_type::parse(content_type)
}

/// Refuses a declared body size over `max_body_bytes` before the body arrives.
pub fn check_content_length(
    config: &Config,
    content_length: Option<&str>,
) -> Result<(), FilterError> {
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
    Ok(())
}

/// A validated offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub sdp: String,
    /// The session part as sent (a JSON object), with an ephemeral key's settings merged in
    /// ([`client_secrets::merge_session`]), or empty.
    pub session_json: String,
    pub model: ResolvedModel,
}

/// Validates the buffered body: structure, SDP, session JSON, model. `key` holds the claims
/// of the caller's ephemeral key, when it has one: its model pin and session settings apply
/// ([`client_secrets`]).
pub fn validate_create_body(
    config: &Config,
    kind: &BodyKind,
    query: Option<&str>,
    body: &[u8],
    key: Option<&Claims>,
) -> Result<Offer, FilterError> {
    if body.len() > config.max_body_bytes {
        return Err(FilterError::BodyTooLarge {
            limit: config.max_body_bytes,
        });
    }
    // The offer and the client's session object, from the body's form.
    let live_body = match kind {
        BodyKind::LiveJson => Some(crate::live::parse(body)?),
        _ => None,
    };
    let (sdp_bytes, session): (&[u8], Option<&[u8]>) = match kind {
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
        BodyKind::LiveJson => (
            live_body.as_ref().map_or(&[][..], |b| b.sdp.as_bytes()),
            None,
        ),
    };
    let sdp = sdp::validate_offer(sdp_bytes, config.max_sdp_bytes)?;
    let (session_json, client_session) = match (&live_body, session) {
        (Some(live), _) => {
            let obj = live.session.clone();
            let text = serde_json::to_string(&obj).map_err(|_| FilterError::Internal)?;
            if text.len() > config.max_session_bytes {
                return Err(FilterError::InvalidSessionJson(
                    "larger than max_session_bytes",
                ));
            }
            (text, Some(obj))
        }
        (_, None) => (String::new(), None),
        (_, Some(raw)) => {
            let text = std::str::from_utf8(raw)
                .map_err(|_| FilterError::InvalidSessionJson("not UTF-8"))?;
            let value: serde_json::Value = serde_json::from_str(text)
                .map_err(|_| FilterError::InvalidSessionJson("not valid JSON"))?;
            let serde_json::Value::Object(obj) = value else {
                return Err(FilterError::InvalidSessionJson("not a JSON object"));
            };
            (text.trim().to_string(), Some(obj))
        }
    };
    let session_model = match &client_session {
        Some(obj) => model::session_model(obj)?,
        None => None,
    };
    let from_query = model::query_model(query)?;
    // A Live session names its model (the `openai` package requires `session.model`).
    if live_body.is_some() && session_model.is_none() && key.is_none_or(|k| k.mdl.is_none()) {
        return Err(FilterError::MissingModel);
    }
    let model = client_secrets::resolve_model(
        config,
        key,
        session_model.as_deref(),
        from_query.as_deref(),
    )?;
    // A model is served for one API: a Live model is not a Realtime call's, nor the reverse.
    let wanted = match kind {
        BodyKind::LiveJson => crate::config::ModelApi::Live,
        _ => crate::config::ModelApi::Realtime,
    };
    if config.models.get(model.index).map(|m| m.api) != Some(wanted) {
        return Err(FilterError::ModelNotFound(model.requested.clone()));
    }
    let session_json = match client_secrets::merge_session(client_session.as_ref(), key) {
        Some(merged) => serde_json::to_string(&merged).map_err(|_| FilterError::Internal)?,
        None => session_json,
    };
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
    /// The API the call speaks (its model's).
    pub api: crate::config::ModelApi,
}

/// What the caller brings to a create besides the offer.
#[derive(Debug, Clone, Copy)]
pub struct CreateRequest<'a> {
    pub offer: &'a Offer,
    /// Who is calling ([`crate::identity`]).
    pub caller: &'a Caller,
    /// The client's `Authorization` header, if any.
    pub authorization: Option<&'a str>,
    /// The routing header's value, if the configuration names one, the request has it and the
    /// caller is trusted to steer.
    pub routing_value: Option<&'a str>,
    /// 128 random bits for the call id.
    pub call_random: &'a [u8; 16],
    pub request_id: &'a str,
}

/// Picks the worker (counting one outstanding call on it), resolves the key, picks the relay
/// replica and builds the gRPC message. On error nothing stays counted.
pub fn plan_create(
    config: &Config,
    req: &CreateRequest<'_>,
    store: &dyn SharedStore,
    now_ms: u64,
) -> Result<Plan, FilterError> {
    let offer = req.offer;
    let admitted = |pool: &crate::config::Pool| req.caller.admitted(config, pool);
    // A model served only by pools that pass the client's own provider key through needs
    // that key: a gateway credential is never forwarded.
    let own_key_only = config.models.get(offer.model.index).is_some_and(|m| {
        m.pools.iter().all(|pi| {
            config
                .pools
                .get(*pi)
                .is_some_and(|p| p.key_policy == crate::keys::KeyPolicy::Passthrough)
        })
    });
    let refused = if own_key_only {
        FilterError::MissingApiKey
    } else {
        req.caller.refusal()
    };
    let choice = routing::pick(
        config,
        offer.model.index,
        req.routing_value,
        &admitted,
        refused,
        store,
        now_ms,
    )?;
    let (Some(pool), Some(worker), Some(model)) = (
        choice.pool(config),
        choice.worker(config),
        config.models.get(offer.model.index),
    ) else {
        return Err(FilterError::Internal);
    };
    let (auth, key_source) =
        match req
            .caller
            .upstream_authorization(pool, req.authorization, worker.key.as_ref())
        {
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
    let call_id =
        realtime_relay_proto::call_id::new_of(model.api.id_kind(), req.call_random, replica_id);
    let upstream_model = worker
        .upstream_model
        .as_deref()
        .unwrap_or(offer.model.upstream_default(model));
    let message = relay::encode_create(&relay::CreateCall {
        call_id: &call_id,
        request_id: req.request_id,
        model: &offer.model.requested,
        upstream_model,
        sdp_offer: &offer.sdp,
        session_json: &offer.session_json,
        base_url: &worker.base_url,
        authorization: &auth,
        worker_id: &worker.id,
        principal: &req.caller.principal(config),
        api: model.api.proto(),
        budget: pool.budget.overridden_by(req.caller.own_budget(config)),
    });
    Ok(Plan {
        call_id,
        cluster,
        replica,
        choice,
        worker_id: worker.id.clone(),
        key_source,
        message,
        api: model.api,
    })
}
