//! The relay's media ports agree across a variant's manifests, for UDP (`RELAY_MEDIA_ADDR`,
//! always) and ICE-TCP (`RELAY_MEDIA_TCP_ADDR`, when set):
//!
//! - the port the relay binds is a container port of that protocol with a `hostPort` (clients
//!   must reach the very pod that holds their call, so no Service is in front of media);
//! - the port the relay advertises (`RELAY_PUBLIC_PORT` / `RELAY_PUBLIC_TCP_PORT`, default the
//!   bound port) is that `hostPort`: the port clients dial on the node;
//! - every NetworkPolicy that selects the relay pods lets that container port in from anywhere
//!   (policies see the pod's port, after the hostPort DNAT);
//! - the TCP media port is excluded from the Istio sidecar's inbound capture
//!   (`traffic.sidecar.istio.io/excludeInboundPorts`): clients speak plain RFC 4571 frames,
//!   not mesh mTLS, and media must not queue behind a proxy (UDP is never captured).
//!
//! A TCP hostPort without `RELAY_MEDIA_TCP_ADDR` (or the reverse) is a problem too.

use std::path::Path;

use yaml_rust2::Yaml;

use crate::manifests::Manifest;

/// The Istio annotation that keeps inbound ports away from the sidecar.
pub const EXCLUDE_INBOUND: &str = "traffic.sidecar.istio.io/excludeInboundPorts";

/// One media protocol: how the relay is told its bound and advertised ports.
struct Media {
    protocol: &'static str,
    addr_flag: &'static str,
    addr_env: &'static str,
    public_flag: &'static str,
    public_env: &'static str,
    /// The relay always has this port (UDP); TCP is optional.
    required: bool,
}

const MEDIA: [Media; 2] = [
    Media {
        protocol: "UDP",
        addr_flag: "--media-addr",
        addr_env: "RELAY_MEDIA_ADDR",
        public_flag: "--public-port",
        public_env: "RELAY_PUBLIC_PORT",
        required: true,
    },
    Media {
        protocol: "TCP",
        addr_flag: "--media-tcp-addr",
        addr_env: "RELAY_MEDIA_TCP_ADDR",
        public_flag: "--public-tcp-port",
        public_env: "RELAY_PUBLIC_TCP_PORT",
        required: false,
    },
];

fn relay_container(doc: &Yaml) -> Option<&Yaml> {
    doc["spec"]["template"]["spec"]["containers"]
        .as_vec()?
        .iter()
        .find(|c| c["name"].as_str() == Some("relay"))
}

/// A relay setting: `--flag=v` or `--flag v` in its arguments, else the env var's value.
fn setting<'a>(c: &'a Yaml, flag: &str, env: &str) -> Option<&'a str> {
    let args: Vec<&str> = c["args"]
        .as_vec()
        .into_iter()
        .flatten()
        .filter_map(Yaml::as_str)
        .collect();
    for (i, a) in args.iter().enumerate() {
        if let Some(v) = a.strip_prefix(flag).and_then(|r| r.strip_prefix('=')) {
            return Some(v);
        }
        if *a == flag {
            return args.get(i + 1).copied();
        }
    }
    c["env"]
        .as_vec()?
        .iter()
        .find(|e| e["name"].as_str() == Some(env))?["value"]
        .as_str()
}

/// The port of `ip:port` or `[v6]:port`.
fn port_of(addr: &str) -> Option<i64> {
    addr.rsplit_once(':')?.1.parse().ok()
}

/// `(containerPort, hostPort)` of the container's `protocol` ports that have a hostPort.
fn host_ports(c: &Yaml, protocol: &str) -> Vec<(i64, i64)> {
    c["ports"]
        .as_vec()
        .into_iter()
        .flatten()
        .filter(|p| p["protocol"].as_str().unwrap_or("TCP") == protocol)
        .filter_map(|p| Some((p["containerPort"].as_i64()?, p["hostPort"].as_i64()?)))
        .collect()
}

/// Whether `policy` selects pods labelled `labels` and restricts their ingress.
fn selects(policy: &Yaml, labels: &Yaml) -> bool {
    let spec = &policy["spec"];
    let ingress_policy = match spec["policyTypes"].as_vec() {
        Some(types) => types.iter().any(|t| t.as_str() == Some("Ingress")),
        // Without policyTypes, every policy restricts ingress.
        None => true,
    };
    let wanted = spec["podSelector"]["matchLabels"].as_hash();
    let matches = wanted.is_none_or(|w| {
        w.iter()
            .all(|(k, v)| labels[k.as_str().unwrap_or("")] == *v)
    });
    ingress_policy && matches
}

/// Whether `policy` lets `protocol` `port` (or the port's `name`) in from anywhere.
fn admits_from_anywhere(policy: &Yaml, protocol: &str, port: i64, name: Option<&str>) -> bool {
    policy["spec"]["ingress"]
        .as_vec()
        .into_iter()
        .flatten()
        .filter(|rule| rule["from"].as_vec().is_none_or(Vec::is_empty))
        .any(|rule| {
            rule["ports"].as_vec().is_none_or(|ports| {
                ports.iter().any(|p| {
                    let proto_ok = p["protocol"].as_str().unwrap_or("TCP") == protocol;
                    let port_ok = match &p["port"] {
                        Yaml::Integer(n) => *n == port,
                        Yaml::String(s) => Some(s.as_str()) == name,
                        Yaml::BadValue => true,
                        _ => false,
                    };
                    proto_ok && port_ok
                })
            })
        })
}

/// The name of the container port `port`/`protocol`, if it has one.
fn port_name<'a>(c: &'a Yaml, protocol: &str, port: i64) -> Option<&'a str> {
    c["ports"].as_vec()?.iter().find_map(|p| {
        (p["containerPort"].as_i64() == Some(port)
            && p["protocol"].as_str().unwrap_or("TCP") == protocol)
            .then(|| p["name"].as_str())?
    })
}

/// Checks every relay workload of one variant (its manifests `in_variant`) against the
/// variant's NetworkPolicies.
pub fn check_variant(variant: &Path, in_variant: &[&Manifest], problems: &mut Vec<String>) {
    let policies: Vec<&Manifest> = in_variant
        .iter()
        .copied()
        .filter(|m| m.kind == "NetworkPolicy")
        .collect();
    for m in in_variant
        .iter()
        .filter(|m| matches!(m.kind.as_str(), "Deployment" | "StatefulSet"))
    {
        let Some(c) = relay_container(&m.doc) else {
            continue;
        };
        let at = format!("{}: {} {}", variant.display(), m.kind, m.name);
        let template = &m.doc["spec"]["template"];
        let labels = &template["metadata"]["labels"];
        for media in &MEDIA {
            let Some(container_port) = check_port(c, media, &at, problems) else {
                continue;
            };
            let name = port_name(c, media.protocol, container_port);
            for p in policies.iter().filter(|p| selects(&p.doc, labels)) {
                if !admits_from_anywhere(&p.doc, media.protocol, container_port, name) {
                    problems.push(format!(
                        "{at}: NetworkPolicy {} does not let {} {container_port} (the relay's \
                         media port) in from anywhere",
                        p.name, media.protocol
                    ));
                }
            }
            if media.protocol == "TCP" {
                let excluded = template["metadata"]["annotations"][EXCLUDE_INBOUND]
                    .as_str()
                    .is_some_and(|list| {
                        list.split(',')
                            .any(|p| p.trim().parse::<i64>() == Ok(container_port))
                    });
                if !excluded {
                    problems.push(format!(
                        "{at}: the ICE-TCP media port {container_port} must be in the pod \
                         annotation {EXCLUDE_INBOUND} (clients send RFC 4571 frames, not mesh \
                         mTLS, and media must not pass through the sidecar)"
                    ));
                }
            }
        }
    }
}

/// The bound media port of `media` when the relay has one and it is consistent with a
/// hostPort and the advertised port; records a problem otherwise.
fn check_port(c: &Yaml, media: &Media, at: &str, problems: &mut Vec<String>) -> Option<i64> {
    let proto = media.protocol;
    let addr = setting(c, media.addr_flag, media.addr_env);
    let mapped = host_ports(c, proto);
    let Some(addr) = addr else {
        if media.required {
            problems.push(format!(
                "{at}: {} is not set: the relay would bind its {proto} media port on loopback",
                media.addr_env
            ));
        } else if !mapped.is_empty() {
            problems.push(format!(
                "{at}: a {proto} hostPort ({mapped:?}) without {}: nothing listens there",
                media.addr_env
            ));
        }
        return None;
    };
    let Some(bound) = port_of(addr) else {
        problems.push(format!("{at}: {} {addr:?} has no port", media.addr_env));
        return None;
    };
    let Some(&(_, host)) = mapped.iter().find(|(container, _)| *container == bound) else {
        problems.push(format!(
            "{at}: {} binds {proto} {bound} but no {proto} container port {bound} has a \
             hostPort (clients reach the pod at the node's address)",
            media.addr_env
        ));
        return None;
    };
    let advertised = match setting(c, media.public_flag, media.public_env) {
        Some(v) => match v.parse::<i64>() {
            Ok(p) => p,
            Err(_) => {
                problems.push(format!("{at}: {} {v:?} is not a port", media.public_env));
                return None;
            }
        },
        None => bound,
    };
    if advertised != host {
        problems.push(format!(
            "{at}: the relay advertises {proto} port {advertised} ({} or the bound port) but \
             the hostPort clients reach is {host}",
            media.public_env
        ));
    }
    Some(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use yaml_rust2::YamlLoader;

    fn manifest(kind: &str, text: &str) -> Manifest {
        Manifest {
            file: PathBuf::from("m.yaml"),
            kind: kind.into(),
            name: "m".into(),
            doc: YamlLoader::load_from_str(text).unwrap().remove(0),
        }
    }

    fn relay(env: &str, ports: &str, annotations: &str) -> Manifest {
        manifest(
            "Deployment",
            &format!(
                "spec:\n  template:\n    metadata:\n      labels: {{app: relay}}\n      \
                 annotations: {{{annotations}}}\n    spec:\n      containers:\n        - name: \
                 relay\n          env: [{env}]\n          ports: [{ports}]\n"
            ),
        )
    }

    const POLICY: &str = "spec:\n  podSelector: {matchLabels: {app: relay}}\n  policyTypes: \
                          [Ingress]\n  ingress:\n    - ports: [{port: 40000, protocol: UDP}, \
                          {port: 8443, protocol: TCP}]\n";
    const ENV: &str = "{name: RELAY_MEDIA_ADDR, value: '0.0.0.0:40000'}, {name: \
                       RELAY_MEDIA_TCP_ADDR, value: '0.0.0.0:8443'}, {name: \
                       RELAY_PUBLIC_TCP_PORT, value: '443'}";
    const PORTS: &str = "{containerPort: 40000, hostPort: 40000, protocol: UDP}, \
                         {containerPort: 8443, hostPort: 443, protocol: TCP}";
    const EXCLUDE: &str = "traffic.sidecar.istio.io/excludeInboundPorts: '8443'";

    fn check(relay: Manifest, policy: &str) -> Vec<String> {
        let policy = manifest("NetworkPolicy", policy);
        let mut problems = Vec::new();
        check_variant(Path::new("v"), &[&relay, &policy], &mut problems);
        problems
    }

    #[test]
    fn consistent_udp_and_tcp_media_ports_pass() {
        assert_eq!(
            check(relay(ENV, PORTS, EXCLUDE), POLICY),
            Vec::<String>::new()
        );
        // Without ICE-TCP at all, only UDP is checked.
        let udp_env = "{name: RELAY_MEDIA_ADDR, value: '0.0.0.0:40000'}";
        let udp_port = "{containerPort: 40000, hostPort: 40000, protocol: UDP}";
        assert_eq!(
            check(relay(udp_env, udp_port, ""), POLICY),
            Vec::<String>::new()
        );
    }

    #[test]
    fn each_inconsistency_is_named() {
        for (env, ports, annotations, policy, want) in [
            (
                ENV.replace("RELAY_PUBLIC_TCP_PORT, value: '443'", "X, value: '1'"),
                PORTS.to_string(),
                EXCLUDE,
                POLICY.to_string(),
                "advertises TCP port 8443",
            ),
            (
                ENV.to_string(),
                PORTS.replace("containerPort: 8443", "containerPort: 8444"),
                EXCLUDE,
                POLICY.to_string(),
                "binds TCP 8443 but no TCP container port 8443",
            ),
            (
                ENV.to_string(),
                PORTS.to_string(),
                EXCLUDE,
                POLICY.replace("port: 8443", "port: 9443"),
                "does not let TCP 8443",
            ),
            (
                ENV.to_string(),
                PORTS.to_string(),
                "",
                POLICY.to_string(),
                "excludeInboundPorts",
            ),
            (
                ENV.replace("RELAY_MEDIA_TCP_ADDR", "UNUSED"),
                PORTS.to_string(),
                EXCLUDE,
                POLICY.to_string(),
                "without RELAY_MEDIA_TCP_ADDR",
            ),
            (
                ENV.replace("RELAY_MEDIA_ADDR", "UNUSED"),
                PORTS.to_string(),
                EXCLUDE,
                POLICY.to_string(),
                "RELAY_MEDIA_ADDR is not set",
            ),
            (
                ENV.to_string(),
                PORTS.replace("hostPort: 40000", "hostPort: 40001"),
                EXCLUDE,
                POLICY.to_string(),
                "advertises UDP port 40000",
            ),
        ] {
            let problems = check(relay(&env, &ports, annotations), &policy);
            assert!(
                problems.iter().any(|p| p.contains(want)),
                "want {want:?} in {problems:?}"
            );
        }
    }

    /// Both shipped relay Deployments offer ICE-TCP, and every variant's media ports agree.
    #[test]
    fn shipped_relays_offer_ice_tcp_consistently() {
        let paths = crate::paths::Paths::discover();
        let all = crate::manifests::load(&paths.deploy_dir()).unwrap();
        let relays: Vec<&Manifest> = all
            .iter()
            .filter(|m| m.kind == "Deployment")
            .filter(|m| relay_container(&m.doc).is_some())
            .collect();
        assert_eq!(relays.len(), 2, "deploy/relay and deploy/replicas");
        for m in relays {
            let c = relay_container(&m.doc).unwrap();
            assert_eq!(
                setting(c, "--media-tcp-addr", "RELAY_MEDIA_TCP_ADDR"),
                Some("0.0.0.0:8443"),
                "{}",
                m.file.display()
            );
            assert_eq!(host_ports(c, "TCP"), [(8443, 443)], "{}", m.file.display());
        }
        for k in crate::manifests::variants(&all) {
            let files = crate::manifests::variant_files(&k.file);
            let in_variant: Vec<&Manifest> = all
                .iter()
                .filter(|m| m.file.canonicalize().is_ok_and(|f| files.contains(&f)))
                .collect();
            let mut problems = Vec::new();
            check_variant(&k.file, &in_variant, &mut problems);
            assert!(problems.is_empty(), "{problems:?}");
        }
    }

    #[test]
    fn flags_win_over_env_and_named_ports_count() {
        let c = YamlLoader::load_from_str(
            "{args: ['--media-tcp-addr', '0.0.0.0:9000'], env: [{name: RELAY_MEDIA_TCP_ADDR, \
             value: '0.0.0.0:8443'}], ports: [{name: media-tcp, containerPort: 9000}]}",
        )
        .unwrap()
        .remove(0);
        assert_eq!(
            setting(&c, "--media-tcp-addr", "RELAY_MEDIA_TCP_ADDR"),
            Some("0.0.0.0:9000")
        );
        assert_eq!(port_name(&c, "TCP", 9000), Some("media-tcp"));
        assert_eq!(port_of("[::]:443"), Some(443));
        let policy = YamlLoader::load_from_str(
            "{spec: {ingress: [{ports: [{port: media-tcp}]}, {from: [{podSelector: {}}], \
             ports: [{port: 9001}]}]}}",
        )
        .unwrap()
        .remove(0);
        assert!(admits_from_anywhere(
            &policy,
            "TCP",
            9000,
            Some("media-tcp")
        ));
        assert!(
            !admits_from_anywhere(&policy, "TCP", 9001, None),
            "from a pod only"
        );
    }
}
