//! Checks that keep relay replicas reachable for hangups in the shipped manifests.
//!
//! Two shapes exist. A relay without replica settings sits behind one cluster and must run as
//! exactly one pod (with several, a hangup is a new load-balancer pick and reaches the wrong
//! replica, e2e/tests/scale_out.rs). A relay in replica mode (RELAY_REPLICA_ADDR) names its
//! pod in call ids, authenticated with RELAY_REPLICA_KEY, and the gateway filter's
//! `relay_pods` sends the hangup there through an ORIGINAL_DST cluster: any number of pods,
//! scaled by `kubectl scale` or an HPA, with nothing listing them.

use std::collections::BTreeSet;
use std::path::Path;

use yaml_rust2::Yaml;

use crate::manifests::Manifest;

fn relay_container(doc: &Yaml) -> Option<&Yaml> {
    doc["spec"]["template"]["spec"]["containers"]
        .as_vec()?
        .iter()
        .find(|c| c["name"].as_str() == Some("relay"))
}

fn env<'a>(container: &'a Yaml, name: &str) -> Option<&'a Yaml> {
    container["env"]
        .as_vec()?
        .iter()
        .find(|e| e["name"].as_str() == Some(name))
}

fn in_replica_mode(doc: &Yaml) -> bool {
    relay_container(doc).is_some_and(|c| {
        env(c, "RELAY_REPLICA_ADDR").is_some()
            || c["args"]
                .as_vec()
                .into_iter()
                .flatten()
                .filter_map(Yaml::as_str)
                .any(|a| a.starts_with("--replica-addr"))
    })
}

/// One relay Deployment on its own: a relay without replica settings runs as one pod; a relay
/// in replica mode takes its address from the downward API, its key from a Secret (never a
/// literal or an argument), its peers from RELAY_PEERS, and leaves the count to the HPA or
/// `kubectl scale` (no `spec.replicas` for re-applies to reset).
pub fn check_relay_deployment(doc: &Yaml, at: &str, problems: &mut Vec<String>) {
    let Some(c) = relay_container(doc) else {
        return;
    };
    let replicas = doc["spec"]["replicas"].as_i64();
    if !in_replica_mode(doc) {
        if replicas.unwrap_or(1) != 1 {
            problems.push(format!(
                "{at}: spec.replicas is {}; a relay without replica settings sits behind one \
                 cluster, where only 1 keeps hangups on the replica that holds the call (use \
                 deploy/replicas/ for several)",
                replicas.unwrap_or(1)
            ));
        }
        return;
    }
    if let Some(n) = replicas {
        problems.push(format!(
            "{at}: spec.replicas is {n}; in replica mode leave the count to the HPA or `kubectl \
             scale` (re-applying would reset it)"
        ));
    }
    let pod_ip = env(c, "POD_IP")
        .is_some_and(|e| e["valueFrom"]["fieldRef"]["fieldPath"].as_str() == Some("status.podIP"));
    let addr = env(c, "RELAY_REPLICA_ADDR").and_then(|e| e["value"].as_str());
    if !pod_ip || !addr.is_some_and(|a| a.starts_with("$(POD_IP):")) {
        problems.push(format!(
            "{at}: RELAY_REPLICA_ADDR must be $(POD_IP):<gRPC port> with POD_IP from the \
             downward API (status.podIP): each pod names its own address (found {addr:?})"
        ));
    }
    match env(c, "RELAY_REPLICA_KEY") {
        Some(e)
            if !e["valueFrom"]["secretKeyRef"]["name"].is_badvalue()
                && e["value"].is_badvalue() => {}
        _ => problems.push(format!(
            "{at}: RELAY_REPLICA_KEY must come from a Secret (valueFrom.secretKeyRef), never a \
             literal value"
        )),
    }
    let args: Vec<&str> = c["args"]
        .as_vec()
        .into_iter()
        .flatten()
        .chain(c["command"].as_vec().into_iter().flatten())
        .filter_map(Yaml::as_str)
        .collect();
    if args
        .iter()
        .any(|a| a.contains("REPLICA_KEY") || a.contains("replica-key"))
    {
        problems.push(format!(
            "{at}: the replica key must not appear in the command line (process listings)"
        ));
    }
    if env(c, "RELAY_PEERS")
        .and_then(|e| e["value"].as_str())
        .is_none_or(str::is_empty)
    {
        problems.push(format!(
            "{at}: RELAY_PEERS must name the headless Service of every replica, so the load \
             refresh covers all of them"
        ));
    }
}

/// Across one variant: an HPA targets only a relay in replica mode; a relay in replica mode
/// comes with a WasmPlugin whose `relay_pods` names an ORIGINAL_DST cluster of the variant
/// (steered by the x-envoy-original-dst-host header) and whose key variable reaches the VM
/// from the proxy's environment; RELAY_PEERS names a headless Service that keeps not-ready
/// pods; no filter config lists replicas one by one (`relay_replicas`).
pub fn check_variant(variant: &Path, in_variant: &[&Manifest], problems: &mut Vec<String>) {
    let at = variant.display();
    let relays: Vec<&Manifest> = in_variant
        .iter()
        .copied()
        .filter(|m| m.kind == "Deployment" && relay_container(&m.doc).is_some())
        .collect();
    for hpa in in_variant
        .iter()
        .filter(|m| m.kind == "HorizontalPodAutoscaler")
    {
        let target = &hpa.doc["spec"]["scaleTargetRef"];
        let relay = relays.iter().find(|d| {
            target["kind"].as_str() == Some("Deployment")
                && target["name"].as_str() == Some(d.name.as_str())
        });
        match relay {
            Some(d) if in_replica_mode(&d.doc) => {}
            Some(d) => problems.push(format!(
                "{at}: HorizontalPodAutoscaler {} scales relay Deployment {}, which is not in \
                 replica mode (hangups would reach the wrong replica)",
                hpa.name, d.name
            )),
            None => problems.push(format!(
                "{at}: HorizontalPodAutoscaler {} targets no relay Deployment of this variant",
                hpa.name
            )),
        }
    }
    let plugins: Vec<&Manifest> = in_variant
        .iter()
        .copied()
        .filter(|m| m.kind == "WasmPlugin")
        .collect();
    for p in &plugins {
        if !p.doc["spec"]["pluginConfig"]["relay_replicas"].is_badvalue() {
            problems.push(format!(
                "{at}: WasmPlugin {} lists relay_replicas one by one; scaling would need an edit \
                 per pod (use relay_pods)",
                p.name
            ));
        }
    }
    let replica_mode = relays.iter().any(|d| in_replica_mode(&d.doc));
    let with_pods: Vec<&&Manifest> = plugins
        .iter()
        .filter(|p| !p.doc["spec"]["pluginConfig"]["relay_pods"].is_badvalue())
        .collect();
    if replica_mode && with_pods.is_empty() {
        problems.push(format!(
            "{at}: the relay runs in replica mode but no WasmPlugin of this variant has \
             relay_pods: hangups would not reach the pod their call id names"
        ));
    }
    if !replica_mode && !with_pods.is_empty() {
        problems.push(format!(
            "{at}: a WasmPlugin has relay_pods but no relay Deployment of this variant runs in \
             replica mode (RELAY_REPLICA_ADDR)"
        ));
    }
    let clusters: Vec<&Yaml> = in_variant
        .iter()
        .filter(|m| m.kind == "EnvoyFilter")
        .flat_map(|m| {
            m.doc["spec"]["configPatches"]
                .as_vec()
                .into_iter()
                .flatten()
        })
        .filter(|p| p["applyTo"].as_str() == Some("CLUSTER"))
        .map(|p| &p["patch"]["value"])
        .collect();
    for p in with_pods {
        let cfg = &p.doc["spec"]["pluginConfig"];
        let pods = &cfg["relay_pods"];
        if cfg["relay_cluster"].as_str().is_none_or(str::is_empty) {
            problems.push(format!(
                "{at}: WasmPlugin {}: relay_pods needs relay_cluster too (creates go to the relay \
                 Service cluster)",
                p.name
            ));
        }
        let name = pods["cluster"].as_str().unwrap_or("");
        match clusters.iter().find(|c| c["name"].as_str() == Some(name)) {
            Some(c) => {
                let header = c["original_dst_lb_config"]["http_header_name"]
                    .as_str()
                    .unwrap_or("x-envoy-original-dst-host");
                let ok = c["type"].as_str() == Some("ORIGINAL_DST")
                    && c["lb_policy"].as_str() == Some("CLUSTER_PROVIDED")
                    && c["original_dst_lb_config"]["use_http_header"].as_bool() == Some(true)
                    && header == "x-envoy-original-dst-host"
                    && !c["typed_extension_protocol_options"]
                        ["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
                        ["explicit_http_config"]["http2_protocol_options"]
                        .is_badvalue()
                    && !c["transport_socket"].is_badvalue();
                if !ok {
                    problems.push(format!(
                        "{at}: cluster {name} (relay_pods.cluster) must be ORIGINAL_DST with \
                         lb_policy CLUSTER_PROVIDED, original_dst_lb_config.use_http_header on \
                         the header x-envoy-original-dst-host, HTTP/2 and the mesh mTLS \
                         transport socket"
                    ));
                }
            }
            None => problems.push(format!(
                "{at}: WasmPlugin {}: relay_pods.cluster `{name}` is not a CLUSTER an EnvoyFilter \
                 of this variant adds",
                p.name
            )),
        }
        let key_env = pods["key_env"].as_str().unwrap_or("");
        let passed = p.doc["spec"]["vmConfig"]["env"]
            .as_vec()
            .into_iter()
            .flatten()
            .any(|e| {
                e["name"].as_str() == Some(key_env) && e["valueFrom"].as_str() == Some("HOST")
            });
        if !passed {
            problems.push(format!(
                "{at}: WasmPlugin {}: relay_pods.key_env `{key_env}` is not passed into the VM \
                 (vmConfig.env with valueFrom: HOST)",
                p.name
            ));
        }
    }
    let headless_keeping_not_ready: BTreeSet<String> = in_variant
        .iter()
        .filter(|m| m.kind == "Service")
        .filter(|s| {
            s.doc["spec"]["clusterIP"].as_str() == Some("None")
                && s.doc["spec"]["publishNotReadyAddresses"].as_bool() == Some(true)
        })
        .map(|s| {
            let ns = s.doc["metadata"]["namespace"].as_str().unwrap_or("default");
            format!("{}.{ns}.svc.cluster.local", s.name)
        })
        .collect();
    for d in relays.iter().filter(|d| in_replica_mode(&d.doc)) {
        let Some(c) = relay_container(&d.doc) else {
            continue;
        };
        let peers = env(c, "RELAY_PEERS")
            .and_then(|e| e["value"].as_str())
            .unwrap_or("");
        for peer in peers.split(',').filter(|p| !p.is_empty()) {
            let host = peer.rsplit_once(':').map_or(peer, |(h, _)| h);
            if !headless_keeping_not_ready.contains(host) {
                problems.push(format!(
                    "{at}: Deployment {}: RELAY_PEERS names {host}, which is not a headless \
                     Service of this variant with publishNotReadyAddresses: true (draining \
                     replicas must stay visible); found {headless_keeping_not_ready:?}",
                    d.name
                ));
            }
        }
    }
}

/// WasmPlugins of the same name (the default's and the replicas variant's, which replace each
/// other) carry the same pluginConfig apart from how the relay is addressed (`relay_*`), and
/// the replicas one passes at least the default's variables into the VM.
pub fn check_plugins_in_step(all: &[Manifest], problems: &mut Vec<String>) {
    let plugins: Vec<&Manifest> = all.iter().filter(|m| m.kind == "WasmPlugin").collect();
    let strip = |m: &Manifest| {
        let mut c = crate::manifests::to_json(&m.doc["spec"]["pluginConfig"]);
        if let Some(o) = c.as_object_mut() {
            o.retain(|k, _| !k.starts_with("relay_"));
        }
        c
    };
    let env = |m: &Manifest| -> BTreeSet<String> {
        m.doc["spec"]["vmConfig"]["env"]
            .as_vec()
            .into_iter()
            .flatten()
            .filter_map(|e| e["name"].as_str().map(str::to_string))
            .collect()
    };
    for (i, a) in plugins.iter().enumerate() {
        for b in &plugins[i + 1..] {
            if a.name != b.name {
                continue;
            }
            if strip(a) != strip(b) {
                problems.push(format!(
                    "WasmPlugin {}: pluginConfig of {} and {} differ beyond relay_* (keep them in \
                     step)",
                    a.name,
                    a.file.display(),
                    b.file.display()
                ));
            }
            let (ea, eb) = (env(a), env(b));
            if !ea.is_subset(&eb) && !eb.is_subset(&ea) {
                problems.push(format!(
                    "WasmPlugin {}: vmConfig.env of {} and {} diverge ({ea:?} vs {eb:?})",
                    a.name,
                    a.file.display(),
                    b.file.display()
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::test_support::{drifted, in_variant};
    use yaml_rust2::YamlLoader;

    fn deployment(replicas: &str, env: &str, args: &str) -> Yaml {
        let text = format!(
            "kind: Deployment\nspec:\n{replicas}  template:\n    spec:\n      containers:\n        \
             - name: relay\n          args: [{args}]\n          env: [{env}]\n"
        );
        YamlLoader::load_from_str(&text).unwrap().remove(0)
    }

    const REPLICA_ENV: &str = "{name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}, \
        {name: RELAY_REPLICA_ADDR, value: '$(POD_IP):50051'}, {name: RELAY_PEERS, value: 'p.ns.svc.cluster.local:50051'}, \
        {name: RELAY_REPLICA_KEY, valueFrom: {secretKeyRef: {name: k, key: RELAY_REPLICA_KEY}}}";

    fn check(doc: &Yaml) -> Vec<String> {
        let mut problems = Vec::new();
        check_relay_deployment(doc, "d", &mut problems);
        problems
    }

    #[test]
    fn a_single_relay_of_several_replicas_is_refused() {
        assert!(check(&deployment("  replicas: 1\n", "", "")).is_empty());
        let p = check(&deployment("  replicas: 2\n", "", ""));
        assert!(p.iter().any(|p| p.contains("deploy/replicas/")), "{p:?}");
    }

    #[test]
    fn replica_mode_needs_pod_ip_secret_key_and_peers_and_no_fixed_count() {
        assert!(check(&deployment("", REPLICA_ENV, "")).is_empty());
        let p = check(&deployment("  replicas: 3\n", REPLICA_ENV, ""));
        assert!(p.iter().any(|p| p.contains("spec.replicas")), "{p:?}");
        let literal = REPLICA_ENV.replace(
            "valueFrom: {secretKeyRef: {name: k, key: RELAY_REPLICA_KEY}}",
            "value: 'a-key-written-into-the-manifest-0123456789'",
        );
        let p = check(&deployment("", &literal, ""));
        assert!(p.iter().any(|p| p.contains("Secret")), "{p:?}");
        let p = check(&deployment("", REPLICA_ENV, "'--replica-key=abc'"));
        assert!(p.iter().any(|p| p.contains("command line")), "{p:?}");
        let node_ip = REPLICA_ENV.replace("status.podIP", "status.hostIP");
        let p = check(&deployment("", &node_ip, ""));
        assert!(p.iter().any(|p| p.contains("RELAY_REPLICA_ADDR")), "{p:?}");
    }

    #[test]
    fn same_named_plugins_stay_in_step() {
        let paths = crate::paths::Paths::discover();
        let all = crate::manifests::load(&paths.deploy_dir()).unwrap();
        let mut problems = Vec::new();
        check_plugins_in_step(&all, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        let drifted = drifted(
            &all,
            |m| m.kind == "WasmPlugin" && m.file.ends_with("replicas/wasmplugin.yaml"),
            "max_body_bytes: 65536",
            "max_body_bytes: 131072",
        );
        check_plugins_in_step(&drifted, &mut problems);
        assert!(
            problems.iter().any(|p| p.contains("differ beyond relay_")),
            "{problems:?}"
        );
    }

    /// The shipped replicas variant passes; without its ORIGINAL_DST cluster, or with an HPA
    /// on the single relay, it does not.
    #[test]
    fn shipped_replicas_variant_is_consistent_and_breakage_is_named() {
        let paths = crate::paths::Paths::discover();
        let all = crate::manifests::load(&paths.deploy_dir()).unwrap();
        let in_dir = |dir: &str| in_variant(&all, &paths, dir);
        let replicas = in_dir("replicas/kustomization.yaml");
        let mut problems = Vec::new();
        check_variant(Path::new("replicas"), &replicas, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        let without_pods_cluster: Vec<&Manifest> = replicas
            .iter()
            .copied()
            .filter(|m| m.name != "realtime-relay-pods")
            .collect();
        check_variant(Path::new("replicas"), &without_pods_cluster, &mut problems);
        assert!(
            problems.iter().any(|p| p.contains("realtime_relay_pods")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("RELAY_PEERS")),
            "the headless Service went too: {problems:?}"
        );
        let mut default = in_dir("kustomization.yaml");
        let hpa = replicas
            .iter()
            .copied()
            .find(|m| m.kind == "HorizontalPodAutoscaler")
            .unwrap();
        default.push(hpa);
        problems.clear();
        check_variant(Path::new("deploy"), &default, &mut problems);
        assert!(
            problems.iter().any(|p| p.contains("not in replica mode")),
            "{problems:?}"
        );
    }
}
