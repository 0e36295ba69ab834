//! Plugin configuration: typed (serde, `deny_unknown_fields`), validated once at load.
//!
//! Keys are never part of this text: a worker names an environment variable (`key_env`) of
//! the Wasm VM, and the caller resolves it through a lookup function at load time.

use crate::budget::Budget;
use crate::callers::{default_admission, parse_admission, Admit, Callers, RawCallers};
use crate::global_limit::GlobalRateLimit;
use crate::limits::Limits;
use std::collections::{HashMap, HashSet};
use std::fmt;

use serde::Deserialize;

use realtime_relay_proto::replica_token::ReplicaKey;

use crate::keys::{KeyPolicy, Secret};
use crate::model::Pattern;
use crate::pods::Pods;
use crate::routing::Policy;

pub const DEFAULT_CALLS_PATH: &str = "/v1/realtime/calls";
pub const DEFAULT_CLIENT_SECRETS_PATH: &str = "/v1/realtime/client_secrets";
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;
pub const DEFAULT_MAX_SDP_BYTES: usize = 32 * 1024;
pub const DEFAULT_MAX_SESSION_BYTES: usize = 16 * 1024;
pub const DEFAULT_CREATE_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_LIVE_PATH: &str = "/v1/live/sessions";

/// The API a model's workers speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelApi {
    /// `POST /v1/realtime/calls` (SDP or multipart), ids `rtc_…`.
    #[default]
    Realtime,
    /// GPT-Live: `POST /v1/live/sessions` (JSON), ids `live_…`.
    Live,
}

impl ModelApi {
    pub fn proto(self) -> realtime_relay_proto::v1::Api {
        match self {
            ModelApi::Realtime => realtime_relay_proto::v1::Api::Realtime,
            ModelApi::Live => realtime_relay_proto::v1::Api::Live,
        }
    }

    pub fn id_kind(self) -> realtime_relay_proto::call_id::Kind {
        match self {
            ModelApi::Realtime => realtime_relay_proto::call_id::Kind::Realtime,
            ModelApi::Live => realtime_relay_proto::call_id::Kind::Live,
        }
    }
}
pub const DEFAULT_HANGUP_TIMEOUT_MS: u64 = 3_000;
/// Upper bound on the sum of weights in one pool (the round-robin schedule has this length).
pub const MAX_POOL_WEIGHT: u32 = 10_000;

/// The plugin configuration as written by the operator (JSON).
/// `relay_pods`: the cluster that reaches one pod by address, and the variable of the VM
/// environment holding the key the relays sign their names with (`RELAY_REPLICA_KEY`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPods {
    pub cluster: String,
    pub key_env: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Envoy cluster of the relay (HTTP/2). Exactly one of this and `relay_replicas`.
    #[serde(default)]
    pub relay_cluster: String,
    /// Relay replicas, one Envoy cluster each. The replica that set a call up is named in
    /// its call id (`rtc_<replica>_<random>`), so its hangup reaches the same replica.
    #[serde(default)]
    pub relay_replicas: Vec<RawReplica>,
    /// Relay replicas that scale without configuration (pods behind `relay_cluster`): each
    /// names itself in its call ids, and hangups reach it through this `ORIGINAL_DST`
    /// cluster (see `crate::pods`). Needs `relay_cluster`; not with `relay_replicas`.
    #[serde(default)]
    pub relay_pods: Option<RawPods>,
    #[serde(default = "default_create_timeout_ms")]
    pub create_timeout_ms: u64,
    #[serde(default = "default_hangup_timeout_ms")]
    pub hangup_timeout_ms: u64,
    #[serde(default = "default_calls_path")]
    pub calls_path: String,
    /// Path where the gateway mints client secrets (`crate::client_secrets`).
    #[serde(default = "default_client_secrets_path")]
    pub client_secrets_path: String,
    /// Path of GPT-Live session creation; controls are `{live_path}/{id}/{verb}`.
    #[serde(default = "default_live_path")]
    pub live_path: String,
    /// Path of the Realtime sideband WebSocket (`GET {sideband_path}?call_id=rtc_…`).
    #[serde(default = "default_sideband_path")]
    pub sideband_path: String,
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    #[serde(default = "default_max_sdp_bytes")]
    pub max_sdp_bytes: usize,
    #[serde(default = "default_max_session_bytes")]
    pub max_session_bytes: usize,
    /// Model used when the request names none (official SDKs send raw SDP without `?model=`).
    #[serde(default)]
    pub default_model: Option<String>,
    /// Request header whose value (a pool name or a worker id) restricts the choice.
    #[serde(default)]
    pub routing_header: Option<String>,
    /// Status for the relay's RESOURCE_EXHAUSTED: 429 (default) or 503.
    #[serde(default = "default_capacity_status")]
    pub capacity_status: u16,
    #[serde(default = "default_retry_after_s")]
    pub retry_after_s: u32,
    #[serde(default)]
    pub ejection: RawEjection,
    /// Period of the ListCalls refresh of live-call counts; 0 disables it.
    #[serde(default = "default_refresh_ms")]
    pub load_refresh_ms: u64,
    /// How a create waits for its body. `false`: pause in the headers callback, which needs
    /// `allow_on_headers_stop_iteration: true` in the Wasm PluginConfig (Envoy 1.35+; without
    /// it the pause becomes stop-all and the body never arrives). `true`: let the headers go on
    /// and hold the body instead, which works in every Envoy, Istio's WasmPlugin included;
    /// the route of creates must then lead somewhere that never answers before the body
    /// (envoy/envoy.yaml's `realtime_hold`), since the router starts its upstream request.
    #[serde(default)]
    pub continue_headers: bool,
    /// Web page origins (`scheme://host[:port]`) whose browser requests may use the gateway,
    /// besides the gateway's own pages; the same list as the routes' CORS policy.
    #[serde(default)]
    pub browser_origins: Vec<String>,
    /// Who may call: operator API keys, the JWT principal, ephemeral keys
    /// (see `crate::callers`).
    #[serde(default)]
    pub callers: RawCallers,
    /// Fleet-wide per-caller limits from a global rate-limit service (`crate::global_limit`).
    #[serde(default)]
    pub global_rate_limit: Option<GlobalRateLimit>,
    pub models: Vec<RawModel>,
    pub pools: Vec<RawPool>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReplica {
    /// 1-16 of `[A-Za-z0-9-]`; appears in call ids.
    pub id: String,
    /// Envoy cluster holding this replica only (HTTP/2, health-checked).
    pub cluster: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEjection {
    /// Consecutive upstream setup failures that eject a worker; 0 disables ejection.
    #[serde(default = "default_eject_failures")]
    pub consecutive_failures: u32,
    #[serde(default = "default_eject_ms")]
    pub duration_ms: u64,
}

impl Default for RawEjection {
    fn default() -> Self {
        RawEjection {
            consecutive_failures: default_eject_failures(),
            duration_ms: default_eject_ms(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    pub name: String,
    /// The API its workers speak: `realtime` (default) or `live` (GPT-Live).
    #[serde(default)]
    pub api: ModelApi,
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Pools serving this model; the first is used unless the routing header picks another.
    pub pools: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub name: String,
    #[serde(default)]
    pub policy: Policy,
    #[serde(default)]
    pub key_policy: KeyPolicy,
    /// Which callers the pool lends its worker key to (see `crate::callers::Admit`); default:
    /// every authenticated caller, no anonymous one.
    #[serde(default)]
    pub callers: Option<Vec<String>>,
    /// Per-caller limits of this pool's calls (`crate::limits`).
    #[serde(default)]
    pub limits: Limits,
    /// What one call of this pool may use (`crate::budget`); an API key's own overrides it.
    #[serde(default)]
    pub budget: Budget,
    pub workers: Vec<RawWorker>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWorker {
    pub id: String,
    pub base_url: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Name of the VM environment variable holding this worker's API key.
    #[serde(default)]
    pub key_env: Option<String>,
    /// Model name this worker expects upstream; default: the model's canonical name.
    #[serde(default)]
    pub upstream_model: Option<String>,
    /// The Envoy cluster that reaches this worker: sideband WebSockets of its calls go there
    /// (`crate::sideband`). None: its calls have no sideband through the gateway.
    #[serde(default)]
    pub cluster: Option<String>,
}

fn default_create_timeout_ms() -> u64 {
    DEFAULT_CREATE_TIMEOUT_MS
}
fn default_hangup_timeout_ms() -> u64 {
    DEFAULT_HANGUP_TIMEOUT_MS
}
fn default_calls_path() -> String {
    DEFAULT_CALLS_PATH.to_string()
}
fn default_sideband_path() -> String {
    crate::sideband::DEFAULT_PATH.to_string()
}

fn default_live_path() -> String {
    DEFAULT_LIVE_PATH.to_string()
}
fn default_client_secrets_path() -> String {
    DEFAULT_CLIENT_SECRETS_PATH.to_string()
}
fn default_max_body_bytes() -> usize {
    DEFAULT_MAX_BODY_BYTES
}
fn default_max_sdp_bytes() -> usize {
    DEFAULT_MAX_SDP_BYTES
}
fn default_max_session_bytes() -> usize {
    DEFAULT_MAX_SESSION_BYTES
}
fn default_capacity_status() -> u16 {
    429
}
fn default_retry_after_s() -> u32 {
    1
}
fn default_eject_failures() -> u32 {
    3
}
fn default_eject_ms() -> u64 {
    30_000
}
fn default_refresh_ms() -> u64 {
    5_000
}
fn default_weight() -> u32 {
    1
}

/// A configuration that failed validation; the text says what and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid plugin configuration: {}", self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// Most relay replicas in one configuration.
pub const MAX_REPLICAS: usize = 64;

/// One relay replica (its own Envoy cluster).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub id: String,
    pub cluster: String,
}

/// One worker, ready to use.
#[derive(Debug, Clone)]
pub struct Worker {
    pub id: String,
    pub base_url: String,
    pub weight: u32,
    pub key: Option<Secret>,
    pub key_env: Option<String>,
    pub upstream_model: Option<String>,
    /// The Envoy cluster of the worker, for sideband connections.
    pub cluster: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Pool {
    pub name: String,
    pub policy: Policy,
    pub key_policy: KeyPolicy,
    /// The callers it lends its worker key to.
    pub callers: Vec<Admit>,
    /// Per-caller limits (an operator key's own override them).
    pub limits: Limits,
    /// Per-call usage budget (an operator key's own, or an ephemeral key's, overrides it).
    pub budget: Budget,
    pub workers: Vec<Worker>,
    /// Smooth weighted round-robin order of worker indexes (length = sum of weights).
    pub schedule: Vec<usize>,
}

#[derive(Debug, Clone)]
pub struct Model {
    pub name: String,
    /// The API its workers speak.
    pub api: ModelApi,
    /// Indexes into `Config::pools`; the first is the default.
    pub pools: Vec<usize>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The relay's cluster when there is one relay (or one Service); empty with replicas.
    pub relay_cluster: String,
    /// Relay replicas addressed one cluster each; empty with `relay_cluster`.
    pub replicas: Vec<Replica>,
    /// Relay pods that name themselves in call ids (with `relay_cluster`).
    pub pods: Option<Pods>,
    pub create_timeout_ms: u64,
    pub hangup_timeout_ms: u64,
    pub calls_path: String,
    pub client_secrets_path: String,
    pub live_path: String,
    pub sideband_path: String,
    pub max_body_bytes: usize,
    pub max_sdp_bytes: usize,
    pub max_session_bytes: usize,
    pub default_model: Option<String>,
    pub routing_header: Option<String>,
    pub capacity_status: u16,
    pub retry_after_s: u32,
    pub eject_after_failures: u32,
    pub eject_ms: u64,
    pub load_refresh_ms: u64,
    /// Creates continue their headers and hold the body (see `RawConfig::continue_headers`).
    pub continue_headers: bool,
    /// Normalized `browser_origins` ([`crate::origin`]).
    pub browser_origins: Vec<String>,
    pub callers: Callers,
    pub global_rate_limit: Option<GlobalRateLimit>,
    pub models: Vec<Model>,
    pub pools: Vec<Pool>,
    /// Canonical names and aliases → index into `models`.
    pub model_index: HashMap<String, usize>,
    /// Prefix entries (`"gpt-realtime*"` as `"gpt-realtime"`) → index into `models`, longest
    /// prefix first.
    pub model_prefixes: Vec<(String, usize)>,
    /// The catch-all entry (`"*"`), if there is one: index into `models`.
    pub model_catch_all: Option<usize>,
}

impl Config {
    /// Parses and validates the plugin configuration. `env` resolves a `key_env` name to its
    /// value (the VM environment in Envoy, a map in tests).
    pub fn from_json(
        text: &[u8],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let raw: RawConfig =
            serde_json::from_slice(text).map_err(|e| ConfigError(e.to_string()))?;
        raw.validate(env)
    }

    /// Whether some pool admits anonymous callers (then an anonymous hangup may end the calls
    /// they made).
    pub fn admits_anonymous(&self) -> bool {
        self.pools
            .iter()
            .any(|p| p.callers.contains(&Admit::Anonymous))
    }

    /// All workers with their pool index.
    pub fn workers(&self) -> impl Iterator<Item = (usize, &Worker)> {
        self.pools
            .iter()
            .enumerate()
            .flat_map(|(pi, p)| p.workers.iter().map(move |w| (pi, w)))
    }

    pub fn worker(&self, id: &str) -> Option<&Worker> {
        self.workers().map(|(_, w)| w).find(|w| w.id == id)
    }

    /// Names of the environment variables the config refers to (for diagnostics).
    /// One line for the log when the configuration loads: relays, models, pools, workers and
    /// how many have a key (never the keys).
    pub fn summary(&self) -> String {
        let workers = self.workers().count();
        let keyed = self.workers().filter(|(_, w)| w.key.is_some()).count();
        let relay = if let Some(p) = &self.pods {
            format!(
                "relay cluster '{}' with pods reached through '{}' (key from {})",
                self.relay_cluster, p.cluster, p.key_env
            )
        } else if self.replicas.is_empty() {
            format!("relay cluster '{}'", self.relay_cluster)
        } else {
            let names: Vec<String> = self
                .replicas
                .iter()
                .map(|r| format!("{}={}", r.id, r.cluster))
                .collect();
            format!("relay replicas [{}]", names.join(", "))
        };
        format!(
            "{relay}, {} models, {} pools, {workers} workers ({keyed} with a key from the VM environment)",
            self.models.len(),
            self.pools.len()
        )
    }

    pub fn key_envs(&self) -> Vec<&str> {
        self.workers()
            .filter_map(|(_, w)| w.key_env.as_deref())
            .collect()
    }
}

fn is_ident(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

fn valid_model_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s == s.trim() && !s.chars().any(char::is_control)
}

fn valid_header_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn valid_base_url(s: &str) -> bool {
    let rest = if let Some(r) = s.strip_prefix("https://") {
        r
    } else if let Some(r) = s.strip_prefix("http://") {
        r
    } else {
        return false;
    };
    let host = rest.split('/').next().unwrap_or("");
    !host.is_empty()
        && !s.ends_with('/')
        && !s.contains(['?', '#', '@', ' '])
        && !s.chars().any(char::is_control)
}

fn validate_replicas(cluster: &str, raw: Vec<RawReplica>) -> Result<Vec<Replica>, ConfigError> {
    if raw.is_empty() {
        if cluster.trim().is_empty() {
            return err("relay_cluster must not be empty (or give relay_replicas)");
        }
        return Ok(Vec::new());
    }
    if !cluster.is_empty() {
        return err("give relay_cluster or relay_replicas, not both");
    }
    if raw.len() > MAX_REPLICAS {
        return err(format!("relay_replicas: at most {MAX_REPLICAS}"));
    }
    let mut ids = HashSet::new();
    let mut clusters = HashSet::new();
    let mut out = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        if !realtime_relay_proto::call_id::is_valid_replica_id(&r.id) {
            return err(format!(
                "relay_replicas[{i}].id '{}' must be 1-16 of [A-Za-z0-9-] (it is part of call ids)",
                r.id
            ));
        }
        if r.cluster.trim().is_empty() {
            return err(format!("relay_replicas[{i}].cluster must not be empty"));
        }
        if !ids.insert(r.id.clone()) {
            return err(format!("relay_replicas[{i}].id '{}' is used twice", r.id));
        }
        if !clusters.insert(r.cluster.clone()) {
            return err(format!(
                "relay_replicas[{i}].cluster '{}' is used twice (one cluster per replica)",
                r.cluster
            ));
        }
        out.push(Replica {
            id: r.id,
            cluster: r.cluster,
        });
    }
    Ok(out)
}

/// Most entries in `browser_origins`: it is searched per browser request.
const MAX_BROWSER_ORIGINS: usize = 64;

fn validate_origins(raw: &[String]) -> Result<Vec<String>, ConfigError> {
    if raw.len() > MAX_BROWSER_ORIGINS {
        return err(format!("browser_origins: at most {MAX_BROWSER_ORIGINS}"));
    }
    raw.iter()
        .enumerate()
        .map(|(i, o)| {
            crate::origin::normalize(o).ok_or_else(|| {
                ConfigError(format!(
                    "browser_origins[{i}] '{o}' must be an origin, scheme://host[:port] (http or https, no path, no wildcard)"
                ))
            })
        })
        .collect()
}

fn validate_pods(
    relay_cluster: &str,
    raw: Option<RawPods>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Pods>, ConfigError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    if relay_cluster.trim().is_empty() {
        return err("relay_pods needs relay_cluster (the relay Service that takes new calls)");
    }
    if raw.cluster.trim().is_empty() {
        return err("relay_pods.cluster must not be empty (an ORIGINAL_DST cluster)");
    }
    if raw.cluster == relay_cluster {
        return err(
            "relay_pods.cluster must differ from relay_cluster (an ORIGINAL_DST cluster with use_http_header)",
        );
    }
    if raw.key_env.is_empty() || raw.key_env.contains(['=', '\0']) {
        return err("relay_pods.key_env must be a variable name");
    }
    let Some(secret) = env(&raw.key_env) else {
        return err(format!(
            "relay_pods.key_env: environment variable '{}' is not set in the Wasm VM (vm_config.environment_variables)",
            raw.key_env
        ));
    };
    let key = ReplicaKey::new(secret.as_bytes()).map_err(|e| {
        ConfigError(format!(
            "relay_pods.key_env: environment variable '{}' {e}",
            raw.key_env
        ))
    })?;
    Ok(Some(Pods::new(raw.cluster, raw.key_env, key)))
}

impl RawConfig {
    pub fn validate(self, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        if self.relay_pods.is_some() && !self.relay_replicas.is_empty() {
            return err("give relay_pods or relay_replicas, not both");
        }
        let pods = validate_pods(&self.relay_cluster, self.relay_pods, env)?;
        let replicas = validate_replicas(&self.relay_cluster, self.relay_replicas)?;
        let browser_origins = validate_origins(&self.browser_origins)?;
        let callers = self.callers.validate(env).map_err(ConfigError)?;
        if let Some(g) = &self.global_rate_limit {
            g.validate().map_err(ConfigError)?;
        }
        if !(1..=300_000).contains(&self.create_timeout_ms) {
            return err("create_timeout_ms must be between 1 and 300000");
        }
        if !(1..=60_000).contains(&self.hangup_timeout_ms) {
            return err("hangup_timeout_ms must be between 1 and 60000");
        }
        for (field, path, example) in [
            ("calls_path", &self.calls_path, DEFAULT_CALLS_PATH),
            (
                "client_secrets_path",
                &self.client_secrets_path,
                DEFAULT_CLIENT_SECRETS_PATH,
            ),
            ("live_path", &self.live_path, DEFAULT_LIVE_PATH),
            (
                "sideband_path",
                &self.sideband_path,
                crate::sideband::DEFAULT_PATH,
            ),
        ] {
            if !path.starts_with('/') || path.ends_with('/') || path.contains(['?', '#']) {
                return err(format!(
                    "{field} must start with '/' and not end with '/' (e.g. {example})"
                ));
            }
        }
        let secrets = self.client_secrets_path.as_str();
        if secrets == self.calls_path
            || secrets
                .strip_prefix(self.calls_path.as_str())
                .is_some_and(|rest| rest.starts_with('/'))
        {
            return err("client_secrets_path must lie outside calls_path (every path under calls_path is a call's)");
        }
        let nested =
            |a: &str, b: &str| a == b || a.strip_prefix(b).is_some_and(|r| r.starts_with('/'));
        if nested(&self.live_path, &self.calls_path) || nested(&self.calls_path, &self.live_path) {
            return err("live_path and calls_path must not contain each other");
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.max_body_bytes) {
            return err("max_body_bytes must be between 1024 and 16777216");
        }
        if self.max_sdp_bytes == 0 || self.max_sdp_bytes > self.max_body_bytes {
            return err("max_sdp_bytes must be between 1 and max_body_bytes");
        }
        if self.max_session_bytes == 0 || self.max_session_bytes > self.max_body_bytes {
            return err("max_session_bytes must be between 1 and max_body_bytes");
        }
        if self.capacity_status != 429 && self.capacity_status != 503 {
            return err("capacity_status must be 429 or 503");
        }
        if self.retry_after_s == 0 || self.retry_after_s > 3600 {
            return err("retry_after_s must be between 1 and 3600");
        }
        if self.ejection.consecutive_failures > 0
            && !(1..=3_600_000).contains(&self.ejection.duration_ms)
        {
            return err("ejection.duration_ms must be between 1 and 3600000");
        }
        if self.load_refresh_ms != 0 && !(100..=3_600_000).contains(&self.load_refresh_ms) {
            return err("load_refresh_ms must be 0 (off) or between 100 and 3600000");
        }
        if let Some(h) = &self.routing_header {
            if !valid_header_name(h) {
                return err(format!(
                    "routing_header '{h}' must be a lowercase HTTP header name"
                ));
            }
        }
        if self.pools.is_empty() {
            return err("pools must not be empty");
        }
        if self.models.is_empty() {
            return err("models must not be empty");
        }

        let mut names: HashSet<String> = HashSet::new();
        let mut pools = Vec::new();
        let mut pool_index: HashMap<String, usize> = HashMap::new();
        for (pi, p) in self.pools.into_iter().enumerate() {
            if !is_ident(&p.name) {
                return err(format!(
                    "pools[{pi}].name '{}' must be 1-64 of [A-Za-z0-9_.-]",
                    p.name
                ));
            }
            if !names.insert(p.name.clone()) {
                return err(format!(
                    "pools[{pi}].name '{}' is used twice (pool names and worker ids share one namespace)",
                    p.name
                ));
            }
            if p.workers.is_empty() {
                return err(format!("pool '{}' has no workers", p.name));
            }
            let mut workers = Vec::new();
            let mut total: u32 = 0;
            for (wi, w) in p.workers.into_iter().enumerate() {
                let at = format!("pool '{}' workers[{wi}]", p.name);
                if !is_ident(&w.id) {
                    return err(format!("{at}.id '{}' must be 1-64 of [A-Za-z0-9_.-]", w.id));
                }
                if !names.insert(w.id.clone()) {
                    return err(format!(
                        "{at}.id '{}' is used twice (pool names and worker ids share one namespace)",
                        w.id
                    ));
                }
                if !valid_base_url(&w.base_url) {
                    return err(format!(
                        "{at}.base_url '{}' must be http(s)://host[:port][/prefix] without trailing '/', query or credentials",
                        w.base_url
                    ));
                }
                if w.weight == 0 || w.weight > 1000 {
                    return err(format!("{at}.weight must be between 1 and 1000"));
                }
                total = total.saturating_add(w.weight);
                if let Some(m) = &w.upstream_model {
                    if !valid_model_name(m) {
                        return err(format!("{at}.upstream_model is not a valid model name"));
                    }
                }
                let key = match &w.key_env {
                    None => None,
                    Some(name) => {
                        if name.is_empty() || name.contains(['=', '\0']) {
                            return err(format!("{at}.key_env must be a variable name"));
                        }
                        match env(name) {
                            None => {
                                return err(format!(
                                    "{at}: environment variable '{name}' (key_env) is not set in the Wasm VM (vm_config.environment_variables)"
                                ))
                            }
                            Some(value) => Some(Secret::from_env_value(&value).map_err(|why| {
                                ConfigError(format!(
                                    "{at}: environment variable '{name}' (key_env) {why}"
                                ))
                            })?),
                        }
                    }
                };
                if p.key_policy == KeyPolicy::Replace && key.is_none() {
                    return err(format!(
                        "{at}: pool key_policy is 'replace' but the worker has no key_env"
                    ));
                }
                if let Some(c) = &w.cluster {
                    if !crate::sideband::valid_cluster_name(c) {
                        return err(format!(
                            "{at}.cluster must be 1-255 characters of letters, digits and _ - . | :"
                        ));
                    }
                }
                workers.push(Worker {
                    id: w.id,
                    base_url: w.base_url,
                    weight: w.weight,
                    key,
                    key_env: w.key_env,
                    upstream_model: w.upstream_model,
                    cluster: w.cluster,
                });
            }
            if total > MAX_POOL_WEIGHT {
                return err(format!(
                    "pool '{}': sum of weights must not exceed {MAX_POOL_WEIGHT}",
                    p.name
                ));
            }
            let weights: Vec<u32> = workers.iter().map(|w| w.weight).collect();
            let admission = match &p.callers {
                None => default_admission(),
                Some(list) => parse_admission(&format!("pool '{}'", p.name), list, &callers)
                    .map_err(ConfigError)?,
            };
            p.limits
                .validate(&format!("pool '{}'", p.name))
                .map_err(ConfigError)?;
            p.budget
                .validate(&format!("pool '{}'", p.name))
                .map_err(ConfigError)?;
            pool_index.insert(p.name.clone(), pi);
            pools.push(Pool {
                name: p.name,
                policy: p.policy,
                key_policy: p.key_policy,
                callers: admission,
                limits: p.limits,
                budget: p.budget,
                schedule: crate::routing::smooth_schedule(&weights),
                workers,
            });
        }

        let mut models = Vec::new();
        let mut model_index: HashMap<String, usize> = HashMap::new();
        let mut model_prefixes: Vec<(String, usize)> = Vec::new();
        let mut model_catch_all: Option<usize> = None;
        for (mi, m) in self.models.into_iter().enumerate() {
            if !valid_model_name(&m.name) {
                return err(format!(
                    "models[{mi}].name '{}' must be 1-128 characters without control characters or surrounding spaces",
                    m.name.escape_debug()
                ));
            }
            let pattern = crate::model::pattern(&m.name)
                .map_err(|why| ConfigError(format!("models[{mi}].name '{}' {why}", m.name)))?;
            if m.pools.is_empty() {
                return err(format!("model '{}' has no pools", m.name));
            }
            let mut idx = Vec::new();
            for pn in &m.pools {
                match pool_index.get(pn) {
                    Some(i) => idx.push(*i),
                    None => return err(format!("model '{}' names unknown pool '{pn}'", m.name)),
                }
            }
            match pattern {
                Pattern::Exact => {}
                Pattern::Prefix(_) | Pattern::CatchAll if !m.aliases.is_empty() => {
                    return err(format!(
                        "models[{mi}].aliases: '{}' is a pattern and takes no aliases (list exact names as entries of their own)",
                        m.name
                    ));
                }
                Pattern::Prefix(prefix) => {
                    if model_prefixes.iter().any(|(p, _)| p == prefix) {
                        return err(format!(
                            "models[{mi}].name '{}': this prefix is defined twice",
                            m.name
                        ));
                    }
                    model_prefixes.push((prefix.to_string(), mi));
                }
                Pattern::CatchAll => {
                    if model_catch_all.replace(mi).is_some() {
                        return err(format!(
                            "models[{mi}].name '*': only one catch-all entry is allowed"
                        ));
                    }
                }
            }
            if pattern == Pattern::Exact && model_index.insert(m.name.clone(), mi).is_some() {
                return err(format!("model name or alias '{}' is defined twice", m.name));
            }
            for (ai, n) in m.aliases.iter().enumerate() {
                if !valid_model_name(n) {
                    return err(format!(
                        "model '{}' alias '{}' is not a valid model name",
                        m.name,
                        n.escape_debug()
                    ));
                }
                if n.contains('*') {
                    return err(format!(
                        "models[{mi}].aliases[{ai}] '{n}': an alias is an exact name, without '*' (a prefix or catch-all is an entry of its own)"
                    ));
                }
                if model_index.insert(n.clone(), mi).is_some() {
                    return err(format!("model name or alias '{n}' is defined twice"));
                }
            }
            models.push(Model {
                name: m.name,
                api: m.api,
                pools: idx,
            });
        }
        // Longest first, so the first prefix that matches a name is the longest.
        model_prefixes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        if let Some(d) = &self.default_model {
            if !model_index.contains_key(d) {
                return err(format!(
                    "default_model '{d}' is not a configured model or alias (it must name one exactly: prefix and catch-all entries do not count)"
                ));
            }
        }

        Ok(Config {
            relay_cluster: self.relay_cluster,
            replicas,
            pods,
            create_timeout_ms: self.create_timeout_ms,
            hangup_timeout_ms: self.hangup_timeout_ms,
            calls_path: self.calls_path,
            client_secrets_path: self.client_secrets_path,
            live_path: self.live_path,
            sideband_path: self.sideband_path,
            max_body_bytes: self.max_body_bytes,
            max_sdp_bytes: self.max_sdp_bytes,
            max_session_bytes: self.max_session_bytes,
            default_model: self.default_model,
            routing_header: self.routing_header,
            capacity_status: self.capacity_status,
            retry_after_s: self.retry_after_s,
            eject_after_failures: self.ejection.consecutive_failures,
            eject_ms: self.ejection.duration_ms,
            load_refresh_ms: self.load_refresh_ms,
            continue_headers: self.continue_headers,
            browser_origins,
            callers,
            global_rate_limit: self.global_rate_limit,
            models,
            pools,
            model_index,
            model_prefixes,
            model_catch_all,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The relays' shared secret in tests (`RELAY_REPLICA_KEY`).
    pub const REPLICA_SECRET: &str = "test-replica-key-0123456789abcdef-xyz";

    /// The sample with `relay_pods` (pods cluster `relay_pods`, key from RELAY_REPLICA_KEY).
    pub fn pods_sample() -> serde_json::Value {
        let mut v: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
        v["relay_pods"] =
            serde_json::json!({"cluster": "relay_pods", "key_env": "RELAY_REPLICA_KEY"});
        v
    }

    #[test]
    fn relay_pods_settings_that_cannot_work_are_refused_naming_the_setting() {
        let ok = Config::from_json(pods_sample().to_string().as_bytes(), &env).unwrap();
        assert_eq!(ok.pods.as_ref().unwrap().cluster, "relay_pods");
        assert!(ok.summary().contains("pods reached through 'relay_pods'"));
        assert!(!format!("{ok:?} {}", ok.summary()).contains(REPLICA_SECRET));
        let refused = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut v = pods_sample();
            edit(&mut v);
            Config::from_json(v.to_string().as_bytes(), &env)
                .unwrap_err()
                .0
        };
        let e = refused(&|v| v["relay_pods"]["key_env"] = "MISSING".into());
        assert!(
            e.contains("relay_pods.key_env") && e.contains("'MISSING' is not set"),
            "{e}"
        );
        let e = refused(&|v| v["relay_pods"]["key_env"] = "SHORT_REPLICA_KEY".into());
        assert!(
            e.contains("relay_pods.key_env") && e.contains("at least 32"),
            "{e}"
        );
        assert!(!e.contains("only-twenty"), "{e}");
        let e = refused(&|v| v["relay_pods"]["cluster"] = "relay".into());
        assert!(e.contains("relay_pods.cluster must differ"), "{e}");
        let e = refused(&|v| v["relay_pods"]["cluster"] = "".into());
        assert!(e.contains("relay_pods.cluster must not be empty"), "{e}");
        let e = refused(&|v| v["relay_cluster"] = "".into());
        assert!(e.contains("relay_pods needs relay_cluster"), "{e}");
        let e = refused(&|v| {
            v["relay_replicas"] = serde_json::json!([{"id": "r0", "cluster": "relay_r0"}]);
        });
        assert!(e.contains("relay_pods or relay_replicas"), "{e}");
        let e = refused(&|v| v["relay_pods"]["extra"] = 1.into());
        assert!(e.contains("unknown field"), "{e}");
    }

    pub fn env(name: &str) -> Option<String> {
        match name {
            "KEY_A" => Some("sk-aaa".into()),
            "KEY_B" => Some("sk-bbb".into()),
            "BAD_KEY" => Some("sk-a\nb".into()),
            "RELAY_REPLICA_KEY" => Some(REPLICA_SECRET.into()),
            "SHORT_REPLICA_KEY" => Some("only-twenty-bytes-.".into()),
            _ => None,
        }
    }

    pub const SAMPLE: &str = r#"{
        "relay_cluster": "relay",
        "browser_origins": ["https://app.example.test", "http://localhost:5173"],
        "callers": {"api_keys": [
            {"name": "ops", "sha256": "426c13d44cd52ef691b00f86796c792580bb33b44d7072f5c4ee7070d233a95f", "operator": true, "trusted": true}
        ]},
        "default_model": "gpt-realtime",
        "routing_header": "x-realtime-route",
        "models": [
            {"name": "gpt-realtime", "aliases": ["gpt-4o-realtime-preview"], "pools": ["main", "canary"]},
            {"name": "echo", "pools": ["local"]},
            {"name": "gpt-live-1", "api": "live", "pools": ["main"]}
        ],
        "pools": [
            {"name": "main", "policy": "weighted_round_robin", "callers": ["anonymous", "api_key", "jwt", "ephemeral"], "workers": [
                {"id": "a", "base_url": "https://api.example.com", "weight": 2, "key_env": "KEY_A"},
                {"id": "b", "base_url": "https://api2.example.com", "weight": 1, "key_env": "KEY_B", "upstream_model": "gpt-realtime-2025"}
            ]},
            {"name": "canary", "policy": "least_outstanding", "key_policy": "replace", "callers": ["anonymous", "api_key"], "workers": [
                {"id": "c", "base_url": "http://127.0.0.1:9000", "key_env": "KEY_A"}
            ]},
            {"name": "local", "key_policy": "passthrough", "workers": [
                {"id": "echo1", "base_url": "http://127.0.0.1:9001"}
            ]}
        ]
    }"#;

    pub fn sample() -> Config {
        Config::from_json(SAMPLE.as_bytes(), &env).unwrap()
    }

    #[test]
    fn sample_config_loads_with_defaults() {
        let c = sample();
        assert_eq!(c.max_body_bytes, 64 * 1024);
        assert_eq!(c.calls_path, "/v1/realtime/calls");
        assert_eq!(c.pools[0].schedule.len(), 3);
        assert_eq!(c.model_index["gpt-4o-realtime-preview"], 0);
        assert_eq!(c.key_envs(), vec!["KEY_A", "KEY_B", "KEY_A"]);
    }

    fn with(patch: impl FnOnce(&mut serde_json::Value)) -> Result<Config, ConfigError> {
        let mut v: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
        patch(&mut v);
        Config::from_json(v.to_string().as_bytes(), &env)
    }

    #[test]
    fn bad_configs_are_refused_with_a_reason() {
        type Patch = Box<dyn FnOnce(&mut serde_json::Value)>;
        let cases: Vec<(&str, Patch)> = vec![
            ("unknown field", Box::new(|v| v["bogus"] = 1.into())),
            (
                "relay_cluster",
                Box::new(|v| v["relay_cluster"] = "".into()),
            ),
            (
                "not both",
                Box::new(|v| {
                    v["relay_replicas"] = serde_json::json!([{"id": "a", "cluster": "r_a"}])
                }),
            ),
            (
                "[A-Za-z0-9-]",
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("relay_cluster");
                    v["relay_replicas"] = serde_json::json!([{"id": "a_b", "cluster": "r"}])
                }),
            ),
            (
                "one cluster per replica",
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("relay_cluster");
                    v["relay_replicas"] = serde_json::json!([
                        {"id": "a", "cluster": "r"}, {"id": "b", "cluster": "r"}
                    ])
                }),
            ),
            (
                "unknown pool",
                Box::new(|v| v["models"][0]["pools"][0] = "nope".into()),
            ),
            (
                "defined twice",
                Box::new(|v| v["models"][1]["aliases"] = serde_json::json!(["gpt-realtime"])),
            ),
            (
                "default_model",
                Box::new(|v| v["default_model"] = "nope".into()),
            ),
            (
                "not set",
                Box::new(|v| v["pools"][0]["workers"][0]["key_env"] = "MISSING".into()),
            ),
            (
                "visible ASCII",
                Box::new(|v| v["pools"][0]["workers"][0]["key_env"] = "BAD_KEY".into()),
            ),
            (
                "base_url",
                Box::new(|v| v["pools"][0]["workers"][0]["base_url"] = "ftp://x".into()),
            ),
            (
                "weight",
                Box::new(|v| v["pools"][0]["workers"][0]["weight"] = 0.into()),
            ),
            (
                "used twice",
                Box::new(|v| v["pools"][0]["workers"][1]["id"] = "a".into()),
            ),
            (
                "used twice",
                Box::new(|v| v["pools"][0]["workers"][1]["id"] = "canary".into()),
            ),
            (
                "replace",
                Box::new(|v| {
                    v["pools"][1]["workers"][0]
                        .as_object_mut()
                        .unwrap()
                        .remove("key_env")
                        .map(|_| ())
                        .unwrap_or(())
                }),
            ),
            (
                "capacity_status",
                Box::new(|v| v["capacity_status"] = 500.into()),
            ),
            (
                "routing_header",
                Box::new(|v| v["routing_header"] = "X Bad".into()),
            ),
            (
                "unknown variant",
                Box::new(|v| v["pools"][0]["policy"] = "random".into()),
            ),
            (
                "unknown variant",
                Box::new(|v| v["pools"][0]["key_policy"] = "always".into()),
            ),
            (
                "max_body_bytes",
                Box::new(|v| v["max_body_bytes"] = 10.into()),
            ),
            (
                "no workers",
                Box::new(|v| v["pools"][2]["workers"] = serde_json::json!([])),
            ),
        ];
        for (want, patch) in cases {
            let e = with(patch).unwrap_err();
            assert!(e.to_string().contains(want), "expected '{want}' in '{e}'");
            assert!(!e.to_string().contains("sk-"), "key leaked in '{e}'");
        }
        assert!(Config::from_json(b"not json", &env).is_err());
    }

    #[test]
    fn model_patterns_are_checked_at_load_and_refusals_name_the_field() {
        let entry = |name: &str| serde_json::json!({"name": name, "pools": ["local"]});
        let push = |names: &[&str]| {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            with(move |v| {
                // SAMPLE's two Realtime models only (its Live model is beside the point here).
                v["models"]
                    .as_array_mut()
                    .unwrap()
                    .retain(|m| m["api"] != "live");
                for n in &names {
                    v["models"].as_array_mut().unwrap().push(entry(n));
                }
            })
        };
        // Accepted, and the exact entries of SAMPLE keep their meaning.
        let ok = push(&["gpt-realtime-mini*", "gpt-*", "*"]).unwrap();
        assert_eq!(ok.model_index["gpt-4o-realtime-preview"], 0);
        assert!(
            !ok.model_index.contains_key("*"),
            "a pattern is no exact name"
        );
        assert!(!ok.model_index.contains_key("gpt-*"));
        assert_eq!(
            ok.model_prefixes,
            vec![
                ("gpt-realtime-mini".to_string(), 2),
                ("gpt-".to_string(), 3)
            ],
            "longest prefix first"
        );
        assert_eq!(ok.model_catch_all, Some(4));
        // A pattern beside the exact name it covers is fine: the exact name wins.
        assert!(push(&["gpt-realtime*"]).is_ok());

        // (names pushed after SAMPLE's two models, what the error must say)
        let rows: &[(&[&str], &[&str])] = &[
            (
                &["gpt-*-mini"],
                &["models[2].name 'gpt-*-mini'", "last character"],
            ),
            (&["*gpt"], &["models[2].name '*gpt'", "last character"]),
            (&["gpt**"], &["models[2].name 'gpt**'", "one '*'"]),
            (&["**"], &["models[2].name '**'", "one '*'"]),
            (&["a*b*"], &["models[2].name 'a*b*'", "one '*'"]),
            (
                &["gpt-*", "gpt-*"],
                &["models[3].name 'gpt-*'", "defined twice"],
            ),
            (&["*", "*"], &["models[3].name '*'", "one catch-all"]),
            (&[" *"], &["models[2].name"]),
            (&["* "], &["models[2].name"]),
        ];
        for (names, want) in rows {
            let e = push(names).unwrap_err().to_string();
            for w in *want {
                assert!(e.contains(w), "{names:?}: expected {w:?} in {e:?}");
            }
        }

        // Aliases are exact names; a pattern entry has none.
        let e = with(|v| v["models"][0]["aliases"] = serde_json::json!(["gpt-x", "gpt-4o*"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("models[0].aliases[1] 'gpt-4o*'"), "{e}");
        let e = with(|v| {
            v["models"].as_array_mut().unwrap().push(
                serde_json::json!({"name": "gpt-realtime-mini*", "aliases": ["mini"], "pools": ["local"]}),
            )
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("models[3].aliases"), "{e}");

        // default_model names a model exactly: a name only a pattern matches is refused.
        for d in [
            "gpt-realtime-mini-2025",
            "gpt-realtime-mini*",
            "*",
            "anything",
        ] {
            let e = with(|v| {
                v["models"]
                    .as_array_mut()
                    .unwrap()
                    .push(entry("gpt-realtime-mini*"));
                v["models"].as_array_mut().unwrap().push(entry("*"));
                v["default_model"] = d.into();
            })
            .unwrap_err()
            .to_string();
            assert!(
                e.contains(&format!("default_model '{d}'")) && e.contains("exactly"),
                "{d}: {e}"
            );
        }
    }

    #[test]
    fn browser_origins_are_origins_normalized_and_bounded() {
        let with = |origins: serde_json::Value| {
            let mut v: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
            v["browser_origins"] = origins;
            Config::from_json(v.to_string().as_bytes(), &env)
        };
        let cfg = with(serde_json::json!([
            "HTTPS://App.Example.test:443",
            "http://[::1]:8080"
        ]))
        .unwrap();
        assert_eq!(
            cfg.browser_origins,
            vec!["https://app.example.test", "http://[::1]:8080"]
        );
        for bad in [
            "*",
            "https://*.example.test",
            "https://app.example.test/",
            "app.example.test",
            "null",
            "",
        ] {
            let e = with(serde_json::json!([bad])).unwrap_err().to_string();
            assert!(e.contains("browser_origins[0]"), "{bad}: {e}");
        }
        let many: Vec<String> = (0..65)
            .map(|i| format!("https://a{i}.example.test"))
            .collect();
        assert!(with(serde_json::json!(many)).is_err());
        let mut v: serde_json::Value = serde_json::from_str(SAMPLE).unwrap();
        v.as_object_mut().unwrap().remove("browser_origins");
        let cfg = Config::from_json(v.to_string().as_bytes(), &env).unwrap();
        assert!(
            cfg.browser_origins.is_empty(),
            "none listed: only the gateway's own pages"
        );
    }
}
