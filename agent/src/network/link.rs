//! The bridge, veth pairs, addresses and routes, through iproute2's `ip`.
//!
//! Why `ip` rather than netlink messages of our own: no netlink crate is in
//! the dependency graph yet (the overlay work will bring `rtnetlink` and can
//! replace this module behind the same functions), `ip` is in every node's
//! base install, and its `-batch` mode does a whole step in one process. The
//! configuration inside a container's namespace runs `ip` with a `setns` in
//! the child before exec, so neither the caller nor its threads change
//! namespace.

use super::{Attachment, NetworkError, Subnet};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// The `ip` binary (iproute2).
const IP: &str = "ip";

/// Runs `ip -batch -` with `commands`; `netns`, if given, is entered first.
fn ip_batch(step: &str, commands: &str, netns: Option<&Path>) -> Result<(), NetworkError> {
    let mut cmd = Command::new(IP);
    cmd.args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let ns_file = match netns {
        Some(path) => Some(
            std::fs::File::open(path).map_err(|e| NetworkError::Command {
                step: step.to_string(),
                message: format!("open {}: {e}", path.display()),
            })?,
        ),
        None => None,
    };
    if let Some(file) = &ns_file {
        let fd = file.as_raw_fd();
        // SAFETY: setns(2) is async-signal-safe, and the closure touches
        // nothing but the fd, which stays open until the child has exec'd.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().map_err(|e| NetworkError::Command {
        step: step.to_string(),
        message: format!("cannot run {IP}: {e}"),
    })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A write error shows up as ip's own failure below.
        let _ = stdin.write_all(commands.as_bytes());
    }
    let output = child
        .wait_with_output()
        .map_err(|e| NetworkError::Command {
            step: step.to_string(),
            message: format!("waiting for {IP}: {e}"),
        })?;
    drop(ns_file);
    if output.status.success() {
        return Ok(());
    }
    Err(NetworkError::Command {
        step: step.to_string(),
        message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    })
}

/// Whether link `name` exists in the calling thread's network namespace.
/// Read from `/proc/thread-self/net/dev`, which follows the thread's
/// namespace and costs no process (not `/sys/class/net`: sysfs shows the
/// namespace it was mounted in, which is not ours under `nsenter --net`).
pub fn exists(name: &str) -> Result<bool, NetworkError> {
    let path = Path::new("/proc/thread-self/net/dev");
    let dev = std::fs::read_to_string(path).map_err(super::io(path))?;
    Ok(dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split_once(':'))
        .any(|(iface, _)| iface.trim() == name))
}

/// The `ip` batch lines that give the bridge the subnet's gateway address
/// and bring it up (idempotent).
fn bridge_lines(bridge: &str, subnet: &Subnet) -> String {
    format!(
        "addr replace {}/{} dev {bridge}\nlink set {bridge} up\n",
        subnet.gateway(),
        subnet.prefix()
    )
}

/// Creates the bridge if it does not exist, gives it the subnet's gateway
/// address and brings it up. Idempotent.
pub fn ensure_bridge(bridge: &str, subnet: &Subnet) -> Result<(), NetworkError> {
    create_bridge(bridge)?;
    ip_batch(
        &format!("set up bridge {bridge}"),
        &bridge_lines(bridge, subnet),
        None,
    )
}

/// Creates the bridge if it does not exist (not yet configured).
fn create_bridge(bridge: &str) -> Result<(), NetworkError> {
    if exists(bridge)? {
        return Ok(());
    }
    let result = ip_batch(
        &format!("create bridge {bridge}"),
        &format!("link add name {bridge} type bridge\n"),
        None,
    );
    match result {
        // Another process may have made it meanwhile.
        Err(_) if exists(bridge)? => Ok(()),
        other => other,
    }
}

/// Sets up the bridge (created if missing, addressed, up) and the veth pair
/// of `a` in one `ip` process: the host side enslaved to the bridge, in
/// hairpin mode and up, the peer created straight inside the container's
/// namespace as `eth0` (so it never needs renaming, and never clashes with
/// a host link).
///
/// Hairpin mode lets the bridge send a frame back out of the port it came
/// in by: with [`bridge_netfilter`] on, a container reaching itself through
/// a published port or a VIP is DNATed and bridged, not routed, and without
/// it that packet is dropped. Docker sets it when its userland proxy is off,
/// Kubernetes' `hairpin-veth` mode likewise.
pub fn create_veth(a: &Attachment) -> Result<(), NetworkError> {
    create_bridge(&a.bridge)?;
    let step = format!("create veth {}", a.host_veth);
    // Both ends get the overlay's MTU, so that no packet is too big for the
    // VXLAN device it may cross.
    let mtu = match a.mtu {
        Some(m) => format!(" mtu {m}"),
        None => String::new(),
    };
    ip_batch(
        &step,
        &format!(
            "{bridge_lines}\
             link add {veth}{mtu} type veth peer name eth0{mtu} netns {netns}\n\
             link set {veth} master {bridge}\n\
             link set {veth} type bridge_slave hairpin on\n\
             link set {veth} up\n",
            bridge_lines = bridge_lines(&a.bridge, &a.subnet),
            veth = a.host_veth,
            netns = a.netns.display(),
            bridge = a.bridge,
        ),
        None,
    )
}

/// Puts the host ends `veths` in hairpin mode (see [`create_veth`]), in one
/// `ip` process. Veths made before Gantry set the mode at creation keep it
/// off until their container is recreated; the agent's start turns it on
/// for every running container's veth instead. Already on is a no-op.
pub fn set_hairpin(veths: &[&str]) -> Result<(), NetworkError> {
    if veths.is_empty() {
        return Ok(());
    }
    let commands: String = veths
        .iter()
        .map(|veth| format!("link set {veth} type bridge_slave hairpin on\n"))
        .collect();
    ip_batch("set hairpin mode on the veths", &commands, None)
}

/// Inside the container's namespace: loopback up, the address on `eth0`,
/// `eth0` up, the default route via the gateway.
pub fn configure_inside(a: &Attachment) -> Result<(), NetworkError> {
    let step = format!("configure eth0 in netns {}", a.netns.display());
    ip_batch(
        &step,
        &format!(
            "link set lo up\n\
             addr replace {ip}/{prefix} dev eth0\n\
             link set eth0 up\n\
             route replace default via {gateway} dev eth0\n",
            ip = a.ip,
            prefix = a.subnet.prefix(),
            gateway = a.gateway,
        ),
        Some(&a.netns),
    )
}

/// Deletes link `name` (its veth peer goes with it); a missing one is fine.
pub fn delete_link(name: &str) -> Result<(), NetworkError> {
    if !exists(name)? {
        return Ok(());
    }
    let result = ip_batch(
        &format!("delete link {name}"),
        &format!("link del {name}\n"),
        None,
    );
    match result {
        Err(_) if !exists(name)? => Ok(()),
        other => other,
    }
}

/// br_netfilter's switch for IPv4 (per network namespace since Linux 5.3).
const BRIDGE_NF_CALL_IPTABLES: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

/// Turns on `bridge-nf-call-iptables` in the caller's network namespace
/// where the kernel has br_netfilter, and says whether it is on.
///
/// On, IPv4 traffic bridged between two containers of the node passes the
/// `ip` family's hooks: the overlay's `forward` chain then isolates
/// networks on the same node too, and conntrack un-NATs a reply that a
/// replica bridges straight back to a client on its bridge, so that a VIP
/// or published port needs no masquerade for it (see `rules::hairpin`).
/// Docker turns it on for its bridges (libnetwork's
/// `setupBridgeNetFiltering`) and kubeadm refuses to run without it. Off
/// (no br_netfilter in the kernel), same-node hairpins are masqueraded and
/// routed, and same-node isolation is not enforced (`docs/network.md`).
///
/// Off is said once per process, as a warning naming what to do: the node
/// still works, but an operator should know its isolation is weaker.
pub fn bridge_netfilter() -> bool {
    let on = match std::fs::read_to_string(BRIDGE_NF_CALL_IPTABLES) {
        Ok(v) if v.trim() == "1" => true,
        Ok(_) => std::fs::write(BRIDGE_NF_CALL_IPTABLES, "1\n").is_ok(),
        Err(_) => false,
    };
    static WARNED: std::sync::Once = std::sync::Once::new();
    if !on {
        WARNED.call_once(|| {
            tracing::warn!(
                "{BRIDGE_NF_CALL_IPTABLES} is missing or cannot be turned on \
                 (load the br_netfilter module): containers on one node's bridge \
                 are not isolated by network, and a container reaching itself \
                 through a VIP or published port is masqueraded"
            );
        });
    }
    on
}

/// Turns on IPv4 forwarding in the caller's network namespace (needed for
/// NAT and published ports) and `route_localnet` on the bridge (so that
/// `127.0.0.1:PORT` can be DNATed to a container, as Docker does without
/// its userland proxy).
pub fn enable_forwarding(bridge: &str) -> Result<(), NetworkError> {
    // /proc/sys/net is per network namespace of the process that opens it.
    let files = [
        "/proc/sys/net/ipv4/ip_forward".to_string(),
        format!("/proc/sys/net/ipv4/conf/{bridge}/route_localnet"),
    ];
    for file in files {
        let path = Path::new(&file);
        match std::fs::read_to_string(path) {
            Ok(v) if v.trim() == "1" => continue,
            // No bridge yet: nothing is published through it either.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            _ => {}
        }
        std::fs::write(path, "1\n").map_err(|e| NetworkError::Command {
            step: format!("enable forwarding ({file})"),
            message: e.to_string(),
        })?;
    }
    Ok(())
}
