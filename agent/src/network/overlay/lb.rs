//! Connect-time load balancing of service VIPs in eBPF, as Cilium's
//! kube-proxy replacement does: a `BPF_PROG_TYPE_CGROUP_SOCK_ADDR` program
//! on `connect()` (IPv4, TCP) rewrites a VIP destination to one ready
//! backend's address before the socket sends anything, so the flow is plain
//! container-to-container traffic: no DNAT, no conntrack NAT entry, no
//! reverse translation on every packet.
//!
//! The nft DNAT of `rules` stays in place unchanged as the always-correct
//! fallback: UDP, a client this agent did not register (the node itself,
//! another agent's containers, a standalone container), a service this
//! program does not carry (more than [`MAX_NETWORKS`] networks, no ready
//! backend) and an agent that is not running all take the nft path.
//!
//! Scope. Each agent loads its own program and maps and attaches them with
//! a bpf_link to the root of the cgroup2 hierarchy (on a hybrid host the
//! `unified` mount): links stack (multi-attach), so the agents of a dev
//! cluster on one machine each run theirs. The link fd is held, not
//! pinned: when the agent dies the kernel detaches the program, traffic
//! falls back to nft DNAT, and a restarted agent attaches afresh and
//! refills its maps. The program first looks the socket's network
//! namespace up (`bpf_get_netns_cookie`): only the agent's own task
//! containers get rewrites, and only for VIPs of networks they are on.
//!
//! Maps (hash maps allocated on update):
//! - `services`: (VIP, port) → { backend slot, count, network ids[4] };
//! - `backends`: (slot, index) → backend address. The VIP's port is the
//!   tasks' port (`target`), so only the address is rewritten;
//! - `members`: (netns cookie, network id) → 1, per local task container.
//!
//! Updates are per changed service: a new backend list is written under a
//! fresh slot, then the service entry is switched to it (one atomic map
//! update), then the old slot is deleted; so a concurrent `connect()` sees
//! the old list or the new one, never an index past the count (and a
//! backend entry deleted under it is a miss: that connect takes the nft
//! path).
//!
//! `getpeername()` on a rewritten socket answers the VIP, as with DNAT: the
//! connect program remembers each rewritten socket's VIP and backend by
//! socket cookie in an LRU map (preallocated, the kernel's only kind), and
//! a `BPF_CGROUP_INET4_GETPEERNAME` program puts the VIP back while the
//! socket is connected to that backend
//! (Cilium's reverse-NAT for its socket LB). Optional: a kernel without
//! the hook, or an evicted entry, answers the replica's address.

use super::state::{DesiredState, ServiceRecord};
use crate::bpf::{
    ADD64_K, CALL, EXIT, FN_GET_NETNS_COOKIE, FN_GET_PRANDOM_U32, FN_GET_SOCKET_COOKIE,
    FN_MAP_LOOKUP_ELEM, FN_MAP_UPDATE_ELEM, Insn, JA, JEQ64_K, JNE64_K, JNE64_X, LDX_MEM_W,
    MOD32_X, MOV64_K, MOV64_X, Map, ST_MEM_W, STX_MEM_DW, STX_MEM_W, insn, ld_map_fd,
};
use crate::engine::spec::PortProtocol;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

/// The most networks a service may join and still be balanced here (the
/// program checks them unrolled); one on more takes the nft path.
pub const MAX_NETWORKS: usize = 4;

const PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const CGROUP_INET4_CONNECT: u32 = 10;
const CGROUP_INET4_GETPEERNAME: u32 = 29;
/// Rewritten sockets remembered for `getpeername()` (an LRU map: one that
/// is evicted, or whose program could not be attached, answers its
/// replica's address instead of the VIP).
const REVERSE_ENTRIES: u32 = 16_384;
const IPPROTO_TCP: i32 = 6;

/// Key of the `services` map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(C)]
struct SvcKey {
    /// The VIP, network byte order (as `bpf_sock_addr.user_ip4`).
    ip: u32,
    /// The port, network byte order in the low 16 bits (as `user_port`).
    port: u32,
}

/// Value of the `services` map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
struct SvcValue {
    slot: u32,
    count: u32,
    /// Network ids (from 1); 0 ends the list.
    nets: [u32; MAX_NETWORKS],
}

/// Key of the `backends` map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
struct BackendKey {
    slot: u32,
    index: u32,
}

/// Key of the `members` map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(C)]
struct MemberKey {
    cookie: u64,
    net: u32,
    pad: u32,
}

fn ip_be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn svc_key(vip: Ipv4Addr, port: u16) -> SvcKey {
    SvcKey {
        ip: ip_be(vip),
        port: u32::from(port.to_be()),
    }
}

// `struct bpf_sock_addr` offsets.
const CTX_USER_IP4: i16 = 4;
const CTX_USER_PORT: i16 = 24;
const CTX_PROTOCOL: i16 = 36;

const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R6: u8 = 6;
const R7: u8 = 7;
const R8: u8 = 8;
const FP: u8 = 10;

/// The connect program. r6 holds the context, r7 the service entry. Stack:
/// the service key at fp-8, the member key at fp-24, the backend key at
/// fp-32, the socket cookie at fp-40. A rewritten socket's VIP is
/// remembered in `reverse` (socket cookie → (VIP, backend)) for
/// [`getpeername_program`].
fn program(
    services: &OwnedFd,
    backends: &OwnedFd,
    members: &OwnedFd,
    reverse: &OwnedFd,
) -> Vec<Insn> {
    /// A jump to the final `return 1` (allow, unchanged), patched below.
    const PASS: i16 = i16::MIN;
    /// A jump to the rewrite, patched below.
    const HIT: i16 = i16::MIN + 1;
    let mut p = vec![
        insn(MOV64_X, R6, R1, 0, 0),
        // TCP only: everything else keeps the nft path.
        insn(LDX_MEM_W, R2, R6, CTX_PROTOCOL, 0),
        insn(JNE64_K, R2, 0, PASS, IPPROTO_TCP),
        insn(LDX_MEM_W, R2, R6, CTX_USER_IP4, 0),
        insn(STX_MEM_W, FP, R2, -8, 0),
        insn(LDX_MEM_W, R2, R6, CTX_USER_PORT, 0),
        insn(STX_MEM_W, FP, R2, -4, 0),
    ];
    p.extend(ld_map_fd(R1, services));
    p.extend([
        insn(MOV64_X, R2, FP, 0, 0),
        insn(ADD64_K, R2, 0, 0, -8),
        insn(CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM),
        insn(JEQ64_K, R0, 0, PASS, 0),
        insn(MOV64_X, R7, R0, 0, 0),
        // Whose socket: the agent's own containers only.
        insn(MOV64_X, R1, R6, 0, 0),
        insn(CALL, 0, 0, 0, FN_GET_NETNS_COOKIE),
        insn(STX_MEM_DW, FP, R0, -24, 0),
        insn(ST_MEM_W, FP, 0, -12, 0),
    ]);
    // Is the client on one of the service's networks? (Unrolled.)
    for k in 0..MAX_NETWORKS as i16 {
        p.extend([
            insn(LDX_MEM_W, R2, R7, 8 + 4 * k, 0),
            insn(JEQ64_K, R2, 0, PASS, 0),
            insn(STX_MEM_W, FP, R2, -16, 0),
        ]);
        p.extend(ld_map_fd(R1, members));
        p.extend([
            insn(MOV64_X, R2, FP, 0, 0),
            insn(ADD64_K, R2, 0, 0, -24),
            insn(CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM),
            insn(JNE64_K, R0, 0, HIT, 0),
        ]);
    }
    p.push(insn(JA, 0, 0, PASS, 0));
    let hit = p.len();
    p.extend([
        insn(CALL, 0, 0, 0, FN_GET_PRANDOM_U32),
        insn(LDX_MEM_W, R3, R7, 4, 0),
        insn(JEQ64_K, R3, 0, PASS, 0),
        insn(MOD32_X, R0, R3, 0, 0),
        insn(STX_MEM_W, FP, R0, -28, 0),
        insn(LDX_MEM_W, R2, R7, 0, 0),
        insn(STX_MEM_W, FP, R2, -32, 0),
    ]);
    p.extend(ld_map_fd(R1, backends));
    p.extend([
        insn(MOV64_X, R2, FP, 0, 0),
        insn(ADD64_K, R2, 0, 0, -32),
        insn(CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM),
        insn(JEQ64_K, R0, 0, PASS, 0),
        insn(LDX_MEM_W, R8, R0, 0, 0),
        // reverse[socket cookie] = (VIP, backend): the service key's first
        // word, and the backend over its port word (no longer needed).
        insn(STX_MEM_W, FP, R8, -4, 0),
        insn(MOV64_X, R1, R6, 0, 0),
        insn(CALL, 0, 0, 0, FN_GET_SOCKET_COOKIE),
        insn(STX_MEM_DW, FP, R0, -40, 0),
    ]);
    p.extend(ld_map_fd(R1, reverse));
    p.extend([
        insn(MOV64_X, R2, FP, 0, 0),
        insn(ADD64_K, R2, 0, 0, -40),
        insn(MOV64_X, R3, FP, 0, 0),
        insn(ADD64_K, R3, 0, 0, -8),
        insn(MOV64_K, R4, 0, 0, 0),
        insn(CALL, 0, 0, 0, FN_MAP_UPDATE_ELEM),
        // The rewrite itself.
        insn(STX_MEM_W, R6, R8, CTX_USER_IP4, 0),
    ]);
    let pass = p.len();
    p.extend([insn(MOV64_K, R0, 0, 0, 1), insn(EXIT, 0, 0, 0, 0)]);
    for (i, ins) in p.iter_mut().enumerate() {
        // A jump lands at pc + off + 1.
        match ins.off {
            PASS => ins.off = (pass - i - 1) as i16,
            HIT if ins.code == JNE64_K => ins.off = (hit - i - 1) as i16,
            _ => {}
        }
    }
    p
}

/// The `getpeername()` program: a socket the connect program rewrote
/// answers the VIP it asked for, as with DNAT (Cilium does the same).
fn getpeername_program(reverse: &OwnedFd) -> Vec<Insn> {
    let mut p = vec![
        insn(MOV64_X, R6, R1, 0, 0),
        insn(CALL, 0, 0, 0, FN_GET_SOCKET_COOKIE),
        insn(STX_MEM_DW, FP, R0, -8, 0),
    ];
    p.extend(ld_map_fd(R1, reverse));
    p.extend([
        insn(MOV64_X, R2, FP, 0, 0),
        insn(ADD64_K, R2, 0, 0, -8),
        insn(CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM),
        insn(JEQ64_K, R0, 0, 5, 0),
        // Only while the socket is still connected to that backend (one
        // connected again elsewhere answers its real peer).
        insn(LDX_MEM_W, R2, R0, 4, 0),
        insn(LDX_MEM_W, R3, R6, CTX_USER_IP4, 0),
        insn(JNE64_X, R2, R3, 2, 0),
        insn(LDX_MEM_W, R2, R0, 0, 0),
        insn(STX_MEM_W, R6, R2, CTX_USER_IP4, 0),
        insn(MOV64_K, R0, 0, 0, 1),
        insn(EXIT, 0, 0, 0, 0),
    ]);
    p
}

/// The network namespace cookie of the namespace bound at `path` (what
/// `bpf_get_netns_cookie` returns for its sockets), read with
/// `SO_NETNS_COOKIE` on a socket made inside it by a short-lived thread.
pub fn netns_cookie(path: &Path) -> std::io::Result<u64> {
    let file = std::fs::File::open(path)?;
    std::thread::scope(|s| {
        s.spawn(|| -> std::io::Result<u64> {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            let sock = std::net::UdpSocket::bind(("127.0.0.1", 0))
                .or_else(|_| std::net::UdpSocket::bind(("0.0.0.0", 0)))?;
            socket_netns_cookie(&sock)
        })
        .join()
        .map_err(|_| std::io::Error::other("the netns thread panicked"))?
    })
}

/// `SO_NETNS_COOKIE` of a socket.
pub fn socket_netns_cookie(sock: &impl AsFd) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a live socket fd and an out buffer of the length passed.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The cgroup2 mount to attach at: the first `cgroup2` entry of
/// `/proc/self/mountinfo` (`/sys/fs/cgroup/unified` on a hybrid host,
/// `/sys/fs/cgroup` on a pure v2 one).
pub fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next() == Some("cgroup2"))
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// What one service puts in the maps.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Entry {
    /// (VIP, port) of its TCP ports; empty: not balanced here.
    keys: Vec<(Ipv4Addr, u16)>,
    networks: Vec<String>,
    backends: Vec<Ipv4Addr>,
}

/// The service's entry, or an empty one when it takes the nft path.
fn entry(s: &ServiceRecord) -> Entry {
    let Some(vip) = s.vip else {
        return Entry::default();
    };
    let backends = s.ready_addresses();
    if backends.is_empty() || s.networks.is_empty() || s.networks.len() > MAX_NETWORKS {
        // No backend: the nft path rejects the VIP. Too many networks: the
        // nft path isolates them.
        return Entry::default();
    }
    let keys: Vec<(Ipv4Addr, u16)> = s
        .ports
        .iter()
        .filter(|p| p.protocol == PortProtocol::Tcp)
        .map(|p| (vip, p.target))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    if keys.is_empty() {
        return Entry::default();
    }
    Entry {
        keys,
        networks: s.networks.clone(),
        backends,
    }
}

/// What was applied for one service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Applied {
    entry: Entry,
    slot: u32,
    /// (task, cookie, network id) of its local clients.
    members: Vec<(String, u64, u32)>,
}

/// Finds the netns of a local task's container: (task id, address) → the
/// namespace's cookie, `None` while its container has none yet.
pub type ClientResolver = Box<dyn FnMut(&str, Ipv4Addr) -> Option<u64> + Send>;

/// The loaded program, its maps and its link, and what is in the maps.
pub struct Balancer {
    services: Map<SvcKey, SvcValue>,
    backends: Map<BackendKey, u32>,
    members: Map<MemberKey, u32>,
    _reverse: Map<u64, [u32; 2]>,
    _prog: OwnedFd,
    _link: OwnedFd,
    /// The getpeername program and its link, or why the kernel refused them.
    peer: Result<(OwnedFd, OwnedFd), String>,
    /// Where it is attached.
    pub cgroup: PathBuf,
    applied: BTreeMap<String, Applied>,
    net_ids: BTreeMap<String, u32>,
    next_slot: u32,
    member_refs: BTreeMap<MemberKey, u32>,
    /// task id → cookie, for local tasks resolved.
    cookies: BTreeMap<String, u64>,
    /// Local tasks whose netns could not be found yet (their container is
    /// not created): retried by [`Balancer::retry`].
    pending: BTreeSet<String>,
    resolver: ClientResolver,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer")
            .field("cgroup", &self.cgroup)
            .field("services", &self.applied.len())
            .finish_non_exhaustive()
    }
}

impl Balancer {
    /// Loads the program and attaches it to the cgroup2 root; the error
    /// names what failed (no cgroup2 mount, no `CAP_BPF`, an old kernel's
    /// verifier), for the one warning that says the node runs on nft DNAT.
    pub fn start(resolver: ClientResolver) -> Result<Balancer, String> {
        let cgroup =
            cgroup2_root().ok_or_else(|| "no cgroup2 mount in /proc/self/mountinfo".to_string())?;
        let map_err = |what: &str| {
            let what = what.to_string();
            move |e: std::io::Error| format!("creating bpf map {what}: {e}")
        };
        let services = Map::hash("gantry_svc", 1 << 16).map_err(map_err("gantry_svc"))?;
        let backends = Map::hash("gantry_backend", 1 << 20).map_err(map_err("gantry_backend"))?;
        let members = Map::hash("gantry_member", 1 << 16).map_err(map_err("gantry_member"))?;
        let reverse =
            Map::lru("gantry_revvip", REVERSE_ENTRIES).map_err(map_err("gantry_revvip"))?;
        let prog = crate::bpf::load(
            PROG_TYPE_CGROUP_SOCK_ADDR,
            CGROUP_INET4_CONNECT,
            "gantry_vip_lb",
            &program(services.fd(), backends.fd(), members.fd(), reverse.fd()),
        )?;
        let dir = std::fs::File::open(&cgroup)
            .map_err(|e| format!("opening cgroup2 root {}: {e}", cgroup.display()))?;
        // getpeername first: a socket rewritten once connect is attached
        // answers the VIP from the start. Optional (kernel 5.8+): without
        // it a rewritten socket's peer is its replica.
        let peer = crate::bpf::load(
            PROG_TYPE_CGROUP_SOCK_ADDR,
            CGROUP_INET4_GETPEERNAME,
            "gantry_vip_peer",
            &getpeername_program(reverse.fd()),
        )
        .and_then(|prog| {
            crate::bpf::link_cgroup(&prog, dir.as_fd(), CGROUP_INET4_GETPEERNAME)
                .map(|link| (prog, link))
                .map_err(|e| format!("attaching: {e}"))
        });
        if let Err(e) = &peer {
            tracing::warn!(
                "connect-time VIP balancing: no getpeername hook ({e}); a balanced socket's peer is its replica's address"
            );
        }
        let link = crate::bpf::link_cgroup(&prog, dir.as_fd(), CGROUP_INET4_CONNECT)
            .map_err(|e| format!("attaching to {}: {e}", cgroup.display()))?;
        Ok(Balancer {
            services,
            backends,
            members,
            _reverse: reverse,
            _prog: prog,
            _link: link,
            peer,
            cgroup,
            applied: BTreeMap::new(),
            net_ids: BTreeMap::new(),
            next_slot: 1,
            member_refs: BTreeMap::new(),
            cookies: BTreeMap::new(),
            pending: BTreeSet::new(),
            resolver,
        })
    }

    /// Whether `getpeername()` of a balanced socket answers the VIP (the
    /// hook is attached) rather than the replica.
    pub fn peer_is_vip(&self) -> bool {
        self.peer.is_ok()
    }

    /// Whether some local task's container could not be found yet.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Makes the maps match every service of `state` (and drop the rest).
    pub fn sync_all(&mut self, state: &DesiredState) -> std::io::Result<()> {
        let gone: Vec<String> = self
            .applied
            .keys()
            .filter(|id| !state.services.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            self.sync_service(&id, None, state)?;
        }
        for s in state.services.values() {
            self.sync_service(&s.id, Some(s), state)?;
        }
        Ok(())
    }

    /// Makes the maps match for the services named (changed or removed).
    pub fn sync_some(
        &mut self,
        changed: &[ServiceRecord],
        removed: &[String],
        state: &DesiredState,
    ) -> std::io::Result<()> {
        for id in removed {
            self.sync_service(id, None, state)?;
        }
        for s in changed {
            // The state's record (the change folded in) is the one to use.
            let current = state.services.get(&s.id);
            self.sync_service(&s.id, current, state)?;
        }
        Ok(())
    }

    /// Tries the pending local tasks again; the services they are in are
    /// re-synced when one is found.
    pub fn retry(&mut self, state: &DesiredState) -> std::io::Result<()> {
        let pending = std::mem::take(&mut self.pending);
        let ids: Vec<String> = state
            .services
            .values()
            .filter(|s| s.endpoints.iter().any(|e| pending.contains(&e.task)))
            .map(|s| s.id.clone())
            .collect();
        for id in ids {
            let s = state.services.get(&id);
            self.sync_service(&id, s, state)?;
        }
        Ok(())
    }

    fn net_id(&mut self, name: &str) -> u32 {
        let next = self.net_ids.len() as u32 + 1;
        *self.net_ids.entry(name.to_string()).or_insert(next)
    }

    /// The (task, cookie) of service `s`'s local endpoints (those in the
    /// node's subnet).
    fn local_clients(&mut self, s: &ServiceRecord, state: &DesiredState) -> Vec<(String, u64)> {
        let Some(subnet) = state.node_subnet else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in &s.endpoints {
            if !subnet.contains(e.address) {
                continue;
            }
            let cookie = match self.cookies.get(&e.task) {
                Some(c) => Some(*c),
                None => {
                    let c = (self.resolver)(&e.task, e.address);
                    if let Some(c) = c {
                        self.cookies.insert(e.task.clone(), c);
                    }
                    c
                }
            };
            match cookie {
                Some(c) => {
                    self.pending.remove(&e.task);
                    out.push((e.task.clone(), c));
                }
                None => {
                    self.pending.insert(e.task.clone());
                }
            }
        }
        out
    }

    fn sync_service(
        &mut self,
        id: &str,
        s: Option<&ServiceRecord>,
        state: &DesiredState,
    ) -> std::io::Result<()> {
        let new_entry = s.map(entry).unwrap_or_default();
        let clients = match s {
            Some(s) => self.local_clients(s, state),
            None => Vec::new(),
        };
        let mut new_members = Vec::new();
        if let Some(s) = s {
            for net in &s.networks {
                let nid = self.net_id(net);
                for (task, cookie) in &clients {
                    new_members.push((task.clone(), *cookie, nid));
                }
            }
        }
        let old = self.applied.remove(id).unwrap_or_default();
        if old.entry == new_entry && old.members == new_members {
            if old != Applied::default() {
                self.applied.insert(id.to_string(), old);
            }
            return Ok(());
        }
        // Members first: a client is allowed before the VIP is switched.
        for (_, cookie, net) in &new_members {
            self.member_ref(*cookie, *net, 1)?;
        }
        let mut slot = old.slot;
        if new_entry.keys.is_empty() {
            for (vip, port) in &old.entry.keys {
                self.services.delete(&svc_key(*vip, *port))?;
            }
            self.delete_backends(old.slot, old.entry.backends.len())?;
            slot = 0;
        } else {
            let fresh = new_entry.backends != old.entry.backends || old.slot == 0;
            if fresh {
                slot = self.next_slot;
                self.next_slot = self.next_slot.wrapping_add(1).max(1);
                for (i, b) in new_entry.backends.iter().enumerate() {
                    let key = BackendKey {
                        slot,
                        index: i as u32,
                    };
                    self.backends.set(&key, &ip_be(*b))?;
                }
            }
            let mut nets = [0u32; MAX_NETWORKS];
            for (i, n) in new_entry.networks.iter().enumerate() {
                nets[i] = self.net_id(n);
            }
            let value = SvcValue {
                slot,
                count: new_entry.backends.len() as u32,
                nets,
            };
            for (vip, port) in &new_entry.keys {
                self.services.set(&svc_key(*vip, *port), &value)?;
            }
            for key in &old.entry.keys {
                if !new_entry.keys.contains(key) {
                    self.services.delete(&svc_key(key.0, key.1))?;
                }
            }
            if fresh && old.slot != 0 {
                self.delete_backends(old.slot, old.entry.backends.len())?;
            }
        }
        for (_, cookie, net) in &old.members {
            self.member_ref(*cookie, *net, -1)?;
        }
        for (task, _, _) in &old.members {
            if !new_members.iter().any(|(t, _, _)| t == task) {
                self.cookies.remove(task);
            }
        }
        let applied = Applied {
            entry: new_entry,
            slot,
            members: new_members,
        };
        if applied.slot != 0 || !applied.members.is_empty() {
            self.applied.insert(id.to_string(), applied);
        }
        Ok(())
    }

    fn delete_backends(&self, slot: u32, count: usize) -> std::io::Result<()> {
        if slot == 0 {
            return Ok(());
        }
        for i in 0..count {
            self.backends.delete(&BackendKey {
                slot,
                index: i as u32,
            })?;
        }
        Ok(())
    }

    fn member_ref(&mut self, cookie: u64, net: u32, delta: i32) -> std::io::Result<()> {
        let key = MemberKey {
            cookie,
            net,
            pad: 0,
        };
        let count = self.member_refs.entry(key).or_insert(0);
        if delta > 0 {
            *count += 1;
            if *count == 1 {
                self.members.set(&key, &1)?;
            }
        } else {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.member_refs.remove(&key);
                self.members.delete(&key)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::overlay::state::tests::service;

    #[test]
    fn entries_carry_tcp_vips_with_ready_backends_only() {
        let mut s = service(
            "web",
            Some([10, 43, 0, 2]),
            &[
                ([10, 42, 1, 3], true),
                ([10, 42, 1, 2], true),
                ([10, 42, 1, 4], false),
            ],
        );
        let e = entry(&s);
        assert_eq!(e.keys, [(Ipv4Addr::new(10, 43, 0, 2), 80)]);
        assert_eq!(
            e.backends,
            [Ipv4Addr::new(10, 42, 1, 2), Ipv4Addr::new(10, 42, 1, 3)]
        );
        // UDP keeps the nft path.
        s.ports[0].protocol = PortProtocol::Udp;
        assert_eq!(entry(&s), Entry::default());
        s.ports[0].protocol = PortProtocol::Tcp;
        // Too many networks for the program: nft.
        s.networks = (0..=MAX_NETWORKS).map(|i| format!("n{i}")).collect();
        assert_eq!(entry(&s), Entry::default());
        // No ready backend: nft (which rejects).
        let none = service("web", Some([10, 43, 0, 2]), &[([10, 42, 1, 3], false)]);
        assert_eq!(entry(&none), Entry::default());
        // dnsrr: no VIP.
        assert_eq!(
            entry(&service("rr", None, &[([10, 42, 1, 3], true)])),
            Entry::default()
        );
    }

    /// Every jump of `prog` lands on an instruction (not past the end, not
    /// in the second half of a 64-bit load); returns the targets.
    fn jump_targets(prog: &[Insn]) -> Vec<(usize, usize)> {
        let halves: BTreeSet<usize> = prog
            .iter()
            .enumerate()
            .filter(|(_, i)| i.code == crate::bpf::LD_IMM64)
            .map(|(k, _)| k + 1)
            .collect();
        let mut out = Vec::new();
        for (k, i) in prog.iter().enumerate() {
            // JMP and JMP32 classes, less call and exit.
            if matches!(i.code & 7, 5 | 6) && i.code != CALL && i.code != EXIT {
                let to = (k as isize + i.off as isize + 1) as usize;
                assert!(
                    to < prog.len() && !halves.contains(&to),
                    "jump at {k} to {to}"
                );
                out.push((k, to));
            }
        }
        out
    }

    #[test]
    fn jumps_land_on_instructions_and_misses_return_unchanged() {
        let fd = || OwnedFd::from(std::fs::File::open("/dev/null").unwrap());
        let (a, b, c, d) = (fd(), fd(), fd(), fd());
        let connect = program(&a, &b, &c, &d);
        let pass = connect.len() - 2;
        assert_eq!(connect[pass], insn(MOV64_K, R0, 0, 0, 1));
        for (from, to) in jump_targets(&connect) {
            // Every miss (a map lookup's null, not TCP, no network
            // matched) leaves the address alone; only the network match
            // jumps forward into the rewrite.
            let i = connect[from];
            if i.code == JEQ64_K || (i.code == JNE64_K && i.imm == IPPROTO_TCP) || i.code == JA {
                assert_eq!(to, pass, "miss at {from}");
            }
        }
        let peer = getpeername_program(&a);
        let end = peer.len() - 2;
        assert_eq!(peer[end], insn(MOV64_K, R0, 0, 0, 1));
        assert_eq!(
            jump_targets(&peer)
                .iter()
                .map(|(_, to)| *to)
                .collect::<Vec<_>>(),
            [end, end],
            "the null lookup and another peer both skip the rewrite"
        );
    }

    #[test]
    fn keys_are_in_network_byte_order() {
        let k = svc_key(Ipv4Addr::new(10, 43, 0, 2), 80);
        assert_eq!(k.ip.to_ne_bytes(), [10, 43, 0, 2]);
        assert_eq!((k.port as u16).to_ne_bytes(), [0, 80]);
        assert_eq!(std::mem::size_of::<SvcValue>(), 8 + 4 * MAX_NETWORKS);
        assert_eq!(std::mem::size_of::<MemberKey>(), 16);
    }

    /// A persistent netns in a temp dir, removed on drop.
    struct TestNs(PathBuf);

    impl TestNs {
        fn new(name: &str) -> TestNs {
            let path = std::env::temp_dir().join(format!(
                "gantry-lb-{}-{name}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos())
            ));
            crate::network::netns::create(&path).expect("create netns");
            let ns = TestNs(path);
            ns.run(|| {
                let out = std::process::Command::new("ip")
                    .args(["link", "set", "lo", "up"])
                    .output()
                    .expect("run ip");
                assert!(out.status.success(), "lo up");
            });
            ns
        }

        /// Runs `f` on a thread inside the namespace.
        fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
            let file = std::fs::File::open(&self.0).expect("open netns");
            std::thread::scope(|s| {
                s.spawn(|| {
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                    f()
                })
                .join()
                .expect("netns thread")
            })
        }
    }

    impl Drop for TestNs {
        fn drop(&mut self) {
            let _ = crate::network::netns::remove(&self.0);
        }
    }

    /// Connects to the VIP `n` times from inside `ns`, where `listener`
    /// listens on port 8080 of every address: the backends reached (the
    /// address each accepted connection was made to), or the error of the
    /// first failure. With `peer_is_vip`, each socket's `getpeername()`
    /// must answer the VIP.
    fn connects(
        ns: &TestNs,
        listener: &std::net::TcpListener,
        n: usize,
        peer_is_vip: bool,
    ) -> Result<BTreeMap<Ipv4Addr, usize>, std::io::ErrorKind> {
        let vip: std::net::SocketAddr = "10.43.200.1:8080".parse().unwrap();
        ns.run(|| {
            let mut seen = BTreeMap::new();
            for _ in 0..n {
                let s =
                    std::net::TcpStream::connect_timeout(&vip, std::time::Duration::from_secs(2))
                        .map_err(|e| e.kind())?;
                if peer_is_vip {
                    assert_eq!(
                        s.peer_addr().unwrap(),
                        vip,
                        "getpeername of a balanced socket"
                    );
                }
                let (conn, _) = listener.accept().unwrap();
                let std::net::SocketAddr::V4(local) = conn.local_addr().unwrap() else {
                    panic!("v6 connection");
                };
                *seen.entry(*local.ip()).or_insert(0) += 1;
            }
            Ok(seen)
        })
    }

    /// The program, through real `connect()`s in namespaces: a registered
    /// client on the service's network is balanced over the ready backends
    /// (and only those) while `getpeername()` answers the VIP, one on
    /// another network and UDP are left alone, and closing the balancer
    /// detaches the program.
    #[test]
    fn kernel_connects_are_balanced_scoped_and_follow_readiness() {
        if !nix::unistd::geteuid().is_root() {
            println!("SKIPPED: needs root (bpf, netns)");
            return;
        }
        let a = TestNs::new("a");
        let b = TestNs::new("b");
        let cookies: BTreeMap<String, u64> = [
            ("cli.0".to_string(), netns_cookie(&a.0).unwrap()),
            ("oth.0".to_string(), netns_cookie(&b.0).unwrap()),
        ]
        .into();
        assert_ne!(cookies["cli.0"], cookies["oth.0"]);
        let resolver = cookies.clone();
        let mut lb = match Balancer::start(Box::new(move |task, _| resolver.get(task).copied())) {
            Ok(lb) => lb,
            Err(e) => {
                println!("SKIPPED: connect-time balancing unavailable here: {e}");
                return;
            }
        };
        let listeners: Vec<_> = [&a, &b]
            .iter()
            .map(|ns| ns.run(|| std::net::TcpListener::bind(("0.0.0.0", 8080)).unwrap()))
            .collect();
        let la = &listeners[0];
        let lb_ = &listeners[1];
        // Both hooks need about the same kernel (5.7 and 5.8): one that
        // takes the connect program must take the getpeername one.
        if let Err(e) = &lb.peer {
            panic!("the getpeername program was refused: {e}");
        }
        let peer = true;
        let mut web = service(
            "web",
            Some([10, 43, 200, 1]),
            &[([127, 0, 0, 1], true), ([127, 0, 0, 2], true)],
        );
        web.ports[0].target = 8080;
        web.networks = vec!["st_front".into()];
        let mut cli = service("cli", None, &[([10, 42, 1, 5], true)]);
        cli.networks = vec!["st_front".into()];
        let mut oth = service("oth", None, &[([10, 42, 1, 6], true)]);
        oth.networks = vec!["st_back".into()];
        let mut state = DesiredState {
            node_subnet: Some("10.42.1.0/24".parse().unwrap()),
            ..DesiredState::default()
        };
        for s in [&web, &cli, &oth] {
            state.services.insert(s.id.clone(), s.clone());
        }
        lb.sync_all(&state).unwrap();
        assert!(!lb.has_pending());

        let seen = connects(&a, la, 40, peer).expect("VIP reached through the program");
        assert_eq!(seen.len(), 2, "both backends picked: {seen:?}");
        // Another network's container: no rewrite, and its namespace has
        // no route to the VIP.
        assert_eq!(
            connects(&b, lb_, 1, peer),
            Err(std::io::ErrorKind::NetworkUnreachable)
        );
        // UDP is not rewritten.
        let udp = a.run(|| {
            let s = std::net::UdpSocket::bind(("127.0.0.1", 0)).unwrap();
            s.connect("10.43.200.1:8080").map_err(|e| e.kind())
        });
        assert_eq!(udp, Err(std::io::ErrorKind::NetworkUnreachable));

        // A backend no longer ready is never picked afterwards.
        web.endpoints[1].ready = false;
        state.services.insert(web.id.clone(), web.clone());
        lb.sync_some(std::slice::from_ref(&web), &[], &state)
            .unwrap();
        let seen = connects(&a, la, 40, peer).unwrap();
        assert_eq!(
            seen.keys().collect::<Vec<_>>(),
            [&Ipv4Addr::new(127, 0, 0, 1)]
        );
        // The old slot's backends are gone from the map.
        let slot = lb.applied["web"].slot;
        assert!(
            lb.backends
                .get(&BackendKey { slot, index: 1 })
                .unwrap()
                .is_none()
        );

        // The client leaving the network loses the rewrite.
        let mut moved = cli.clone();
        moved.networks = vec!["st_back".into()];
        state.services.insert(moved.id.clone(), moved.clone());
        lb.sync_some(std::slice::from_ref(&moved), &[], &state)
            .unwrap();
        assert_eq!(
            connects(&a, la, 1, peer),
            Err(std::io::ErrorKind::NetworkUnreachable)
        );
        state.services.insert(cli.id.clone(), cli.clone());
        lb.sync_some(std::slice::from_ref(&cli), &[], &state)
            .unwrap();
        assert!(connects(&a, la, 1, peer).is_ok());

        // The service removed: no rewrite; its entries are gone.
        state.services.remove("web");
        lb.sync_some(&[], &["web".to_string()], &state).unwrap();
        assert_eq!(
            connects(&a, la, 1, peer),
            Err(std::io::ErrorKind::NetworkUnreachable)
        );
        assert!(
            lb.services
                .get(&svc_key(Ipv4Addr::new(10, 43, 200, 1), 8080))
                .unwrap()
                .is_none()
        );

        // Back, then the balancer dropped: the kernel detaches the program.
        state.services.insert(web.id.clone(), web.clone());
        lb.sync_all(&state).unwrap();
        assert!(connects(&a, la, 1, peer).is_ok());
        drop(lb);
        assert_eq!(
            connects(&a, la, 1, peer),
            Err(std::io::ErrorKind::NetworkUnreachable)
        );
        // A restarted agent: a new balancer, refilled from the whole state.
        let resolver = cookies.clone();
        let mut again = Balancer::start(Box::new(move |task, _| resolver.get(task).copied()))
            .expect("second start");
        again.sync_all(&state).unwrap();
        assert_eq!(connects(&a, la, 20, peer).map(|s| s.len()), Ok(1));
        drop(listeners);
    }
}
