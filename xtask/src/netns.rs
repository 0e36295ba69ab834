//! Hosts in Linux network namespaces, for topology tests that need real addresses instead of
//! one loopback interface: a client, a gateway, relay "nodes" with a "pod" behind NAT, a
//! provider.
//!
//! A [`Lab`] owns everything it creates and removes it in `Drop`, also when a test panics:
//!
//! - namespaces named `rtgw-<pid>-<host>`, `<pid>` being the test process, so runs beside each
//!   other never collide, and a namespace left by a killed run names a process that no longer
//!   lives: [`Lab::new`] deletes those ([`cleanup_stale`]);
//! - a switch namespace with a Linux bridge, and veth pairs from hosts to it ([`Lab::attach`])
//!   or between two hosts ([`Lab::link`]); every interface lives inside a namespace of the lab,
//!   nothing is added to the machine's own network namespace;
//! - addresses from the benchmarking range 198.18.0.0/15 (RFC 2544) only, refused otherwise,
//!   so a test can never reach or shadow a real network;
//! - nftables DNAT and masquerade in the NodePort shape ([`Lab::node_port`]).
//!
//! Processes run inside a namespace through [`Netns::exec_in`] (`ip netns exec`, which execs
//! the program, so the child's PID is the program's) and are owned by the caller's
//! [`crate::process::ChildGuard`]s, stopped by PID. The lab's own teardown kills what is still
//! inside its namespaces (only processes this lab started, directly or as descendants such as
//! Chromium under chromedriver, can be there) before deleting them: a namespace whose last
//! process is gone disappears with its interfaces, NAT rules and routes.
//!
//! The test process itself talks to a host through [`Netns::within`]: a short-lived thread that
//! enters the namespace (`setns`) and runs a closure there. A socket keeps the namespace it was
//! created in, so a client socket made there can be driven from any thread afterwards.
//!
//! [`support`] says whether namespaces can be made here (root, `ip`, `nft`); tests print a SKIP
//! line naming what is missing, and fail instead when `RTGW_REQUIRE_NETNS=1` (CI).

use std::ffi::OsStr;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};

use crate::process::{display, output};

/// Every namespace this module creates starts with this.
pub const PREFIX: &str = "rtgw-";
/// Environment variable that turns a [`support`] skip into a failure (set in `.ci/run`).
pub const REQUIRE_ENV: &str = "RTGW_REQUIRE_NETNS";
const IP: &str = "ip";
const NFT: &str = "nft";
const SETUP_HINT: &str = "Run `cargo xtask setup` as root (installs iproute2 and nftables).";

/// Whether network namespaces can be created here; `Err` names what is missing.
pub fn support() -> std::result::Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err("creating network namespaces needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN)".into());
    }
    for (tool, package) in [(IP, "iproute2"), (NFT, "nftables")] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Err(format!(
                "`{tool}` is not installed (Debian package {package}; `cargo xtask setup` \
                 installs it as root)"
            ));
        }
    }
    // The tools exist; can this kernel/container actually make a namespace?
    let probe = format!("{PREFIX}{}-probe", std::process::id());
    let made = Command::new(IP)
        .args(["netns", "add", &probe])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    match made {
        Ok(o) if o.status.success() => {
            let _ = Command::new(IP).args(["netns", "delete", &probe]).status();
            Ok(())
        }
        Ok(o) => Err(format!(
            "`ip netns add` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("`ip netns add` could not run: {e}")),
    }
}

/// For tests: `true` when the lab can run; otherwise prints `SKIP <test>: <reason>` and
/// returns `false`, or panics with the reason when [`REQUIRE_ENV`] is `1`.
pub fn available_or_skip(test: &str) -> bool {
    match support() {
        Ok(()) => true,
        Err(why) => {
            if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
                panic!("{test}: network namespaces are required ({REQUIRE_ENV}=1) but {why}");
            }
            // Straight to the stderr handle, not `eprintln!`: the test harness captures the
            // macros' output of passing tests, and a skip must be seen, not read as a pass.
            let _ = writeln!(
                std::io::stderr(),
                "SKIP {test}: {why}. This test did not run; set {REQUIRE_ENV}=1 to make that a \
                 failure."
            );
            false
        }
    }
}

/// One network namespace (a handle: cheap to clone, deleting is the [`Lab`]'s job).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// A handle on an existing namespace called `name`.
    pub fn named(name: impl Into<String>) -> Netns {
        Netns { name: name.into() }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `program` to be run inside this namespace (`ip netns exec <name> <program>`); add
    /// arguments and spawn it as usual.
    pub fn exec_in(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(IP);
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `program args` inside this namespace to completion; its stdout, or an error with
    /// its stderr.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        output(self.exec_in(program).args(args), SETUP_HINT)
    }

    /// [`Netns::run`] with `input` on the program's stdin (an nftables ruleset).
    pub fn run_with_input(&self, program: &str, args: &[&str], input: &str) -> Result<()> {
        let mut cmd = self.exec_in(program);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| crate::process::spawn_error(&cmd, &e, SETUP_HINT))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input.as_bytes())
                .with_context(|| format!("writing to `{}`", display(&cmd)))?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "`{}` failed: {}\ninput:\n{input}",
                display(&cmd),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns its result. Sockets
    /// `f` creates belong to this namespace for their whole life, whichever thread uses them
    /// later. A panic in `f` is passed on.
    pub fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        std::thread::scope(|s| {
            s.spawn(|| {
                // This thread ends when `f` returns, and the namespace with it.
                self.enter_current_thread()?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Moves the calling thread into this namespace for the rest of its life (for example
    /// from a tokio runtime's `on_thread_start`, so that every socket its tasks open belongs to
    /// this host). Prefer [`Netns::within`] where a closure will do.
    pub fn enter_current_thread(&self) -> Result<()> {
        let path = Path::new("/run/netns").join(&self.name);
        let file = std::fs::File::open(&path)
            .with_context(|| format!("opening {} (namespace gone?)", path.display()))?;
        // SAFETY: setns(2) with a valid namespace fd; CLONE_NEWNET changes only the calling
        // thread's network namespace, which a multi-threaded process may do.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            bail!(
                "entering network namespace {}: {}",
                self.name,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// PIDs of the processes inside (`ip netns pids`).
    pub fn pids(&self) -> Vec<u32> {
        Command::new(IP)
            .args(["netns", "pids", &self.name])
            .stderr(Stdio::null())
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Runs `f` inside `ns` ([`Netns::within`]), or right here when there is no namespace.
pub fn maybe_within<T: Send>(ns: Option<&Netns>, f: impl FnOnce() -> T + Send) -> Result<T> {
    match ns {
        Some(ns) => ns.within(f),
        None => Ok(f()),
    }
}

/// An IPv4 address with its prefix length, inside 198.18.0.0/15.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    /// `addr/prefix`; refused outside the benchmarking range 198.18.0.0/15.
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Cidr> {
        if !is_benchmarking(addr) || !(15..=32).contains(&prefix) {
            bail!(
                "{addr}/{prefix}: the lab uses only the benchmarking range 198.18.0.0/15 \
                 (RFC 2544), so it can never reach or shadow a real network"
            );
        }
        Ok(Cidr { addr, prefix })
    }

    /// The network this address is in, as `a.b.c.d/p`.
    pub fn network(&self) -> String {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        format!(
            "{}/{}",
            Ipv4Addr::from(u32::from(self.addr) & mask),
            self.prefix
        )
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Whether `ip` is in 198.18.0.0/15.
pub fn is_benchmarking(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    o[0] == 198 && (o[1] & 0xfe) == 18
}

/// Transport of a [`NodePort`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Udp,
    Tcp,
}

impl Proto {
    fn nft(self) -> &'static str {
        match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
        }
    }
}

/// One forwarded port in the shape of a Kubernetes NodePort/hostPort: traffic to
/// `node address:port` goes to `to_ip:to_port` (the pod).
#[derive(Clone, Copy, Debug)]
pub struct NodePort {
    pub proto: Proto,
    pub port: u16,
    pub to_ip: Ipv4Addr,
    pub to_port: u16,
}

/// The nftables ruleset of [`Lab::node_port`]: DNAT from the node address to the pod (each
/// rule counts what it translated: [`node_port_packets`]), and
/// masquerade of the pod subnet's traffic leaving through `uplink` (pod egress appears with the
/// node's address, as kube-proxy and most CNIs do for destinations outside the cluster).
pub fn node_port_ruleset(
    node_addr: Ipv4Addr,
    uplink: &str,
    pod_net: &str,
    ports: &[NodePort],
) -> String {
    let mut dnat = String::new();
    for p in ports {
        dnat.push_str(&format!(
            "    ip daddr {node_addr} {proto} dport {port} counter dnat to {ip}:{to}\n",
            proto = p.proto.nft(),
            port = p.port,
            ip = p.to_ip,
            to = p.to_port
        ));
    }
    format!(
        "table ip rtgw_nodeport {{\n\
         \x20 chain prerouting {{\n\
         \x20   type nat hook prerouting priority dstnat; policy accept;\n\
         {dnat}\
         \x20 }}\n\
         \x20 chain postrouting {{\n\
         \x20   type nat hook postrouting priority srcnat; policy accept;\n\
         \x20   ip saddr {pod_net} oifname \"{uplink}\" masquerade\n\
         \x20 }}\n\
         }}\n"
    )
}

/// Packets the [`Lab::node_port`] DNAT rule for `proto`/`port` on `node` has translated (new
/// connections: nftables' NAT chains see the first packet of each flow).
pub fn node_port_packets(node: &Netns, proto: Proto, port: u16) -> Result<u64> {
    let table = node.run(NFT, &["list", "table", "ip", "rtgw_nodeport"])?;
    let rule = format!("{} dport {port} counter packets ", proto.nft());
    table
        .lines()
        .find_map(|l| l.split_once(&rule))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| anyhow!("no DNAT rule for {}/{port} in:\n{table}", proto.nft()))
}

/// The nftables table of [`block_udp`].
const NO_UDP_TABLE: &str = "rtgw_no_udp";

/// The ruleset of [`block_udp`]: every UDP packet into or out of the host is dropped and
/// counted, on every interface (a firewall that lets only TCP through).
pub fn udp_block_ruleset() -> String {
    format!(
        "table inet {NO_UDP_TABLE} {{\n\
         \x20 chain input {{\n\
         \x20   type filter hook input priority filter; policy accept;\n\
         \x20   meta l4proto udp counter drop\n\
         \x20 }}\n\
         \x20 chain output {{\n\
         \x20   type filter hook output priority filter; policy accept;\n\
         \x20   meta l4proto udp counter drop\n\
         \x20 }}\n\
         }}\n"
    )
}

/// Makes `host` a client behind a UDP-blocking firewall ([`udp_block_ruleset`]); undone by
/// [`unblock_udp`] or with the namespace.
pub fn block_udp(host: &Netns) -> Result<()> {
    host.run_with_input(NFT, &["-f", "-"], &udp_block_ruleset())
}

/// Removes [`block_udp`]'s table from `host`.
pub fn unblock_udp(host: &Netns) -> Result<()> {
    host.run(NFT, &["delete", "table", "inet", NO_UDP_TABLE])?;
    Ok(())
}

/// UDP packets [`block_udp`] has dropped on `host`: (incoming, outgoing).
pub fn udp_dropped_packets(host: &Netns) -> Result<(u64, u64)> {
    let table = host.run(NFT, &["list", "table", "inet", NO_UDP_TABLE])?;
    let mut counts = table.lines().filter_map(|l| {
        let (_, rest) = l.split_once("udp counter packets ")?;
        rest.split_whitespace().next()?.parse::<u64>().ok()
    });
    match (counts.next(), counts.next()) {
        (Some(input), Some(output)) => Ok((input, output)),
        _ => bail!("no UDP drop counters in:\n{table}"),
    }
}

/// Namespaces, links and NAT of one test; all removed on drop.
pub struct Lab {
    /// `rtgw-<pid>-`.
    prefix: String,
    /// Created namespaces, in order (the switch, if any, first).
    namespaces: Vec<Netns>,
    switch: Option<Netns>,
    /// Host ports on the switch so far (names the bridge ports).
    switch_ports: usize,
}

impl Lab {
    /// A new, empty lab; first deletes namespaces left by runs whose process is gone.
    pub fn new() -> Result<Lab> {
        if let Err(why) = support() {
            bail!("network namespaces are not available: {why}");
        }
        cleanup_stale()?;
        Ok(Lab {
            prefix: format!("{PREFIX}{}-", std::process::id()),
            namespaces: Vec::new(),
            switch: None,
            switch_ports: 0,
        })
    }

    /// A new namespace `rtgw-<pid>-<name>` with its loopback up. `name`: letters, digits, `-`.
    pub fn host(&mut self, name: &str) -> Result<Netns> {
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            bail!("host name {name:?}: use letters, digits and -");
        }
        let ns = Netns::named(format!("{}{name}", self.prefix));
        output(
            Command::new(IP).args(["netns", "add", ns.name()]),
            SETUP_HINT,
        )?;
        self.namespaces.push(ns.clone());
        ns.run(IP, &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The switch: a namespace holding bridge `br0`, created on first use.
    fn switch(&mut self) -> Result<Netns> {
        if let Some(sw) = &self.switch {
            return Ok(sw.clone());
        }
        let sw = self.host("switch")?;
        sw.run(IP, &["link", "add", "br0", "type", "bridge"])?;
        sw.run(IP, &["link", "set", "br0", "up"])?;
        self.switch = Some(sw.clone());
        Ok(sw)
    }

    /// Plugs `host` into the switch: a veth pair whose host end is `ifname` with `addr`.
    pub fn attach(&mut self, host: &Netns, ifname: &str, addr: Cidr) -> Result<()> {
        let sw = self.switch()?;
        self.switch_ports += 1;
        let port = format!("p{}", self.switch_ports);
        veth(host, ifname, &sw, &port)?;
        sw.run(IP, &["link", "set", &port, "master", "br0"])?;
        sw.run(IP, &["link", "set", &port, "up"])?;
        up_with_addr(host, ifname, addr)
    }

    /// A point-to-point veth pair between two hosts (a node and its pod).
    pub fn link(
        &mut self,
        a: &Netns,
        a_if: &str,
        a_addr: Cidr,
        b: &Netns,
        b_if: &str,
        b_addr: Cidr,
    ) -> Result<()> {
        veth(a, a_if, b, b_if)?;
        up_with_addr(a, a_if, a_addr)?;
        up_with_addr(b, b_if, b_addr)
    }

    /// A route on `host` to `dest` (`a.b.c.d/p` or `default`) via `gateway`.
    pub fn route(&self, host: &Netns, dest: &str, gateway: Ipv4Addr) -> Result<()> {
        host.run(IP, &["route", "add", dest, "via", &gateway.to_string()])?;
        Ok(())
    }

    /// Lets `host` forward IPv4 packets between its interfaces (a router, a node).
    pub fn forwarding(&self, host: &Netns) -> Result<()> {
        // /proc/sys/net belongs to the namespace of the process that opens it.
        host.within(|| std::fs::write("/proc/sys/net/ipv4/ip_forward", "1"))?
            .with_context(|| format!("enabling IPv4 forwarding in {}", host.name()))
    }

    /// The NodePort shape on `node`: DNAT of `node_addr`'s `ports` to the pod, masquerade of
    /// `pod_net` leaving through `uplink`; also enables forwarding. Returns the ruleset.
    pub fn node_port(
        &self,
        node: &Netns,
        node_addr: Ipv4Addr,
        uplink: &str,
        pod_net: &str,
        ports: &[NodePort],
    ) -> Result<String> {
        self.forwarding(node)?;
        let rules = node_port_ruleset(node_addr, uplink, pod_net, ports);
        node.run_with_input(NFT, &["-f", "-"], &rules)?;
        Ok(rules)
    }

    /// Replaces nothing, adds an nftables ruleset on `host` (e.g. a firewall).
    pub fn nft(&self, host: &Netns, ruleset: &str) -> Result<()> {
        host.run_with_input(NFT, &["-f", "-"], ruleset)
    }

    /// The namespaces created so far.
    pub fn namespaces(&self) -> &[Netns] {
        &self.namespaces
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            remove(ns);
        }
    }
}

fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    // Both ends are created directly inside their namespaces: no interface ever appears in
    // the machine's own namespace, and names need to be unique only per namespace.
    output(
        Command::new(IP).args([
            "link",
            "add",
            a_if,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            b_if,
            "netns",
            b.name(),
        ]),
        SETUP_HINT,
    )?;
    Ok(())
}

fn up_with_addr(host: &Netns, ifname: &str, addr: Cidr) -> Result<()> {
    host.run(IP, &["addr", "add", &addr.to_string(), "dev", ifname])?;
    host.run(IP, &["link", "set", ifname, "up"])?;
    Ok(())
}

/// Kills what is still inside `ns` (SIGKILL by PID) and deletes it.
fn remove(ns: &Netns) {
    for pid in ns.pids() {
        if let Ok(pid) = libc::pid_t::try_from(pid) {
            // SAFETY: kill(2) has no memory-safety preconditions. The PID was listed inside a
            // namespace only this lab's processes could enter.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    let _ = Command::new(IP)
        .args(["netns", "delete", ns.name()])
        .stderr(Stdio::null())
        .status();
}

/// The PID in a namespace name `rtgw-<pid>-<host>`.
pub fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid, host) = rest.split_once('-')?;
    (!host.is_empty()).then_some(())?;
    pid.parse().ok()
}

/// Deletes namespaces `rtgw-<pid>-*` whose process no longer lives (a run that was killed
/// before its teardown). Namespaces of live runs are left alone.
pub fn cleanup_stale() -> Result<Vec<String>> {
    let list = output(Command::new(IP).args(["netns", "list"]), SETUP_HINT)?;
    let mut removed = Vec::new();
    for line in list.lines() {
        // `name (id: 3)` or `name`.
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = owner_pid(name) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        remove(&Netns::named(name));
        removed.push(name.to_string());
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_benchmarking_range_is_accepted() {
        assert!(Cidr::new(Ipv4Addr::new(198, 18, 0, 10), 24).is_ok());
        assert!(Cidr::new(Ipv4Addr::new(198, 19, 255, 1), 24).is_ok());
        for ip in [
            [198, 17, 0, 1],
            [198, 20, 0, 1],
            [10, 0, 0, 1],
            [127, 0, 0, 1],
        ] {
            assert!(Cidr::new(Ipv4Addr::from(ip), 24).is_err(), "{ip:?}");
        }
        assert!(Cidr::new(Ipv4Addr::new(198, 18, 0, 1), 8).is_err());
        let c = Cidr::new(Ipv4Addr::new(198, 19, 1, 2), 24).unwrap();
        assert_eq!(c.network(), "198.19.1.0/24");
        assert_eq!(c.to_string(), "198.19.1.2/24");
    }

    #[test]
    fn namespace_names_carry_the_owning_pid() {
        assert_eq!(owner_pid("rtgw-1234-client"), Some(1234));
        assert_eq!(owner_pid("rtgw-1234-node-1"), Some(1234));
        assert_eq!(owner_pid("rtgw-1234-"), None);
        assert_eq!(owner_pid("rtgw-x-client"), None);
        assert_eq!(owner_pid("other-1234-client"), None);
    }

    #[test]
    fn node_port_ruleset_has_the_dnat_and_the_masquerade() {
        let rules = node_port_ruleset(
            Ipv4Addr::new(198, 18, 0, 31),
            "lan",
            "198.19.1.0/24",
            &[NodePort {
                proto: Proto::Udp,
                port: 30478,
                to_ip: Ipv4Addr::new(198, 19, 1, 2),
                to_port: 40000,
            }],
        );
        assert!(
            rules.contains("ip daddr 198.18.0.31 udp dport 30478 counter dnat to 198.19.1.2:40000"),
            "{rules}"
        );
        assert!(
            rules.contains("ip saddr 198.19.1.0/24 oifname \"lan\" masquerade"),
            "{rules}"
        );
    }

    #[test]
    fn udp_block_ruleset_drops_udp_both_ways() {
        let rules = udp_block_ruleset();
        assert!(rules.contains("table inet rtgw_no_udp"), "{rules}");
        for hook in ["hook input", "hook output"] {
            assert!(rules.contains(hook), "{rules}");
        }
        assert_eq!(rules.matches("meta l4proto udp counter drop").count(), 2);
    }

    /// Two hosts on the switch reach each other, a stale namespace of a dead PID is removed,
    /// and dropping the lab deletes its namespaces.
    #[test]
    fn a_lab_connects_hosts_and_leaves_nothing_behind() {
        if !available_or_skip("a_lab_connects_hosts_and_leaves_nothing_behind") {
            return;
        }
        // A namespace named after a PID that cannot be alive (above pid_max).
        let stale = format!("{PREFIX}4294967-client");
        let _ = Command::new(IP).args(["netns", "add", &stale]).status();
        let names;
        {
            let mut lab = Lab::new().unwrap();
            let a = lab.host("a").unwrap();
            let b = lab.host("b").unwrap();
            lab.attach(
                &a,
                "lan",
                Cidr::new(Ipv4Addr::new(198, 18, 0, 1), 24).unwrap(),
            )
            .unwrap();
            lab.attach(
                &b,
                "lan",
                Cidr::new(Ipv4Addr::new(198, 18, 0, 2), 24).unwrap(),
            )
            .unwrap();
            let listener = b
                .within(|| std::net::TcpListener::bind("198.18.0.2:0"))
                .unwrap()
                .unwrap();
            let port = listener.local_addr().unwrap().port();
            let connected = a
                .within(move || {
                    std::net::TcpStream::connect_timeout(
                        &format!("198.18.0.2:{port}").parse().unwrap(),
                        std::time::Duration::from_secs(5),
                    )
                    .is_ok()
                })
                .unwrap();
            assert!(connected);
            // Behind block_udp, `a` sends and receives no UDP, while TCP still connects.
            block_udp(&a).unwrap();
            let b_udp = b
                .within(|| std::net::UdpSocket::bind("198.18.0.2:0"))
                .unwrap()
                .unwrap();
            b_udp
                .set_read_timeout(Some(std::time::Duration::from_millis(300)))
                .unwrap();
            let b_udp_addr = b_udp.local_addr().unwrap();
            let a_udp = a
                .within(|| std::net::UdpSocket::bind("198.18.0.1:0"))
                .unwrap()
                .unwrap();
            let _ = a_udp.send_to(b"out", b_udp_addr);
            assert!(b_udp.recv_from(&mut [0; 16]).is_err(), "UDP left a");
            b_udp.send_to(b"in", a_udp.local_addr().unwrap()).unwrap();
            a_udp
                .set_read_timeout(Some(std::time::Duration::from_millis(300)))
                .unwrap();
            assert!(a_udp.recv_from(&mut [0; 16]).is_err(), "UDP reached a");
            let (dropped_in, dropped_out) = udp_dropped_packets(&a).unwrap();
            assert!(
                dropped_in >= 1 && dropped_out >= 1,
                "{dropped_in} {dropped_out}"
            );
            let still = a
                .within(move || {
                    std::net::TcpStream::connect_timeout(
                        &format!("198.18.0.2:{port}").parse().unwrap(),
                        std::time::Duration::from_secs(5),
                    )
                    .is_ok()
                })
                .unwrap();
            assert!(still, "TCP blocked too");
            unblock_udp(&a).unwrap();
            names = lab
                .namespaces()
                .iter()
                .map(|n| n.name().to_string())
                .collect::<Vec<_>>();
        }
        let list = output(Command::new(IP).args(["netns", "list"]), "").unwrap();
        assert!(!list.contains(&stale), "stale namespace kept: {list}");
        for n in names {
            assert!(!list.contains(&n), "{n} kept: {list}");
        }
    }
}
