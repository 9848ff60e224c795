//! Where the controller is, and a gRPC client of its `Control` service.
//!
//! The address comes from, in order: the global `--controller HOST:PORT`
//! flag, the `GANTRY_CONTROLLER` environment variable, the context file
//! `/run/gantry/context.json` (written by `gantry up` and `gantry dev cluster
//! up`, removed when they go down), and finally `127.0.0.1:7070`, where
//! `gantry up` listens. The flag and the variable may be comma lists and the
//! context file lists every controller (`controllers`; the older single
//! `controller` key is still read): the client asks the first controller
//! that answers where the leader is and talks to the leader (logs and exec
//! go through its agent sessions), else to a controller that knows one, so
//! a dead or partitioned controller is skipped (a connect times out after
//! 1 s when there are others). Every message about an unreachable controller names
//! the address and where it came from, so that a stale context file or a
//! forgotten variable is obvious.
//!
//! **Failover mid-command.** A request whose controller fails under it
//! (the connection breaks, or the controller answers that it cannot serve
//! the request now: no leader, no quorum, shutting down — its UNAVAILABLE
//! carries `gantry-retry`) is sent again to the next controller (the leader
//! first, when known) for up to [`FAILOVER_BUDGET`], when the client knows
//! more than one controller; one given alone is never swapped for another.
//! Such a failure may come after the controller accepted a write, so its
//! outcome is unknown (as etcd's clients treat it). Every write the CLI
//! makes is safe to repeat, so it is repeated ([`Repeat`]): a deploy, a
//! scale or a node update state what should be (a repeat that finds it done
//! changes nothing), and a removal that a repeat finds already gone
//! succeeds with a note (the first attempt may have removed it). The one
//! request that is not repeated is
//! `exec` once its command may have started (see `cmd/exec.rs`). Streams
//! are re-opened: `events` and the waits from where they were, `service
//! logs` from the time of the last line printed.
//!
//! gRPC status codes become exit codes here: the codes that mean the request
//! itself was wrong (`INVALID_ARGUMENT`, `NOT_FOUND`, `FAILED_PRECONDITION`,
//! `ALREADY_EXISTS`) exit 2 like any other bad input; everything else exits 1.
//!
//! The connection is plain h2c: this issue has no TLS (DESIGN's mTLS and the
//! admin certificate in the context file come later).

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use gantry_proto::tonic::transport::{Channel, Endpoint};
use gantry_proto::tonic::{Code, Status};
use gantry_proto::v1::cluster_client::ClusterClient;
use gantry_proto::v1::control_client::ControlClient;
use serde::Deserialize;

use crate::cmd::UsageError;

/// The context file that `gantry up` and `gantry dev cluster up` write.
pub const CONTEXT_FILE: &str = "/run/gantry/context.json";

/// The environment variable that moves the context file (tests use it so
/// that a `gantry up` they start never redirects the machine's CLI).
pub const CONTEXT_FILE_ENV: &str = "GANTRY_CONTEXT_FILE";

/// The context file in effect: `$GANTRY_CONTEXT_FILE`, else [`CONTEXT_FILE`].
pub fn context_file() -> std::path::PathBuf {
    std::env::var_os(CONTEXT_FILE_ENV)
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(CONTEXT_FILE))
}

/// The environment variable naming the controller.
pub const CONTROLLER_ENV: &str = "GANTRY_CONTROLLER";

/// Where `gantry up` listens, and so where a plain `gantry` looks last.
pub const DEFAULT_CONTROLLER: &str = "127.0.0.1:7070";

/// How long a connection attempt may take before the controller counts as
/// unreachable. Loopback and the dev cluster's bridge answer in
/// microseconds; a few seconds covers a busy machine without making a wrong
/// address hang.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The same when other controllers could answer instead: a controller cut
/// off by a partition is skipped after this long (a controller on the dev
/// cluster's bridge answers in well under a millisecond).
const FAILOVER_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a command keeps trying other controllers after the one it
/// talks to failed under a request: an election takes 0.5–1 s, and a
/// controller cut off by a partition costs a 1 s connect timeout.
pub const FAILOVER_BUDGET: Duration = Duration::from_secs(10);

/// How a request may be repeated on another controller after the one it
/// went to failed under it (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repeat {
    /// A read: repeat anywhere.
    Read,
    /// A write that is safe to repeat after an unknown outcome: a
    /// declarative one (deploy, scale, node update) leaves the same state;
    /// a removal is [`Client::call_remove`].
    Write,
}

/// Why a request failed in a way that another controller may not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failover {
    /// For the user: what went wrong.
    pub why: String,
    /// Whether the controller may have acted on the request (the failure
    /// came after it was sent).
    pub maybe_applied: bool,
}

/// Whether `status` means "try another controller", and whether the
/// request may have taken effect. A status the controller sent with
/// `gantry-retry` (no leader, no quorum, shutting down, a timeout) may
/// follow a proposal; a transport failure may follow the request's bytes,
/// except a refused connect. Other statuses are answers.
pub fn failover_of(status: &Status) -> Option<Failover> {
    if let Some(cause) = std::error::Error::source(status).map(error_chain) {
        if !matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        ) {
            return None;
        }
        let refused = cause.contains("onnection refused") || cause.contains("tcp connect error");
        return Some(Failover {
            why: format!("{}: {cause}", status.message()),
            maybe_applied: !refused,
        });
    }
    if status.code() == Code::Unavailable
        && status
            .metadata()
            .get(gantry_controller::server::replication::RETRY_METADATA)
            .is_some()
    {
        return Some(Failover {
            why: status.message().to_string(),
            maybe_applied: true,
        });
    }
    None
}

/// What the user asks a client command to talk to: the global
/// `--controller` flag, if given.
#[derive(Debug, Clone, Default)]
pub struct ControllerFlag(pub Option<String>);

/// Where an address came from, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The `--controller` flag.
    Flag,
    /// The `GANTRY_CONTROLLER` variable.
    Env,
    /// A context file, with the `source` it records (who wrote it).
    Context {
        /// The file.
        path: PathBuf,
        /// Its `source` field (`dev cluster gantry`, `gantry up`), if any.
        writer: Option<String>,
    },
    /// Nothing was configured.
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag => f.write_str("--controller"),
            Source::Env => write!(f, "{CONTROLLER_ENV}"),
            Source::Context { path, writer } => match writer {
                Some(writer) => write!(f, "{}, written by {writer}", path.display()),
                None => write!(f, "{}", path.display()),
            },
            Source::Default => f.write_str("the default"),
        }
    }
}

/// A controller's address and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `HOST:PORT`.
    pub address: String,
    /// Where it came from.
    pub source: Source,
    /// The other controllers of the same cluster, tried in order when
    /// `address` cannot be reached or has no leader (a context file lists
    /// every controller; the flag and the variable take a comma list).
    pub fallbacks: Vec<String>,
}

impl Target {
    /// Every address, `address` first.
    pub fn addresses(&self) -> Vec<String> {
        std::iter::once(self.address.clone())
            .chain(self.fallbacks.iter().cloned())
            .collect()
    }

    fn from_list(list: Vec<String>, source: Source) -> Option<Target> {
        let mut list = list.into_iter();
        let address = list.next()?;
        Some(Target {
            address,
            source,
            fallbacks: list.collect(),
        })
    }
}

/// The context file's contents: `controllers` (every controller, written
/// by `gantry dev cluster up`) or the older single `controller`.
#[derive(Debug, Deserialize)]
struct ContextFile {
    #[serde(default)]
    controller: String,
    #[serde(default)]
    controllers: Vec<String>,
    #[serde(default)]
    source: Option<String>,
}

/// `a,b , c` as `[a, b, c]`, blanks dropped.
fn split_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Picks the controller address: flag, then environment, then context file,
/// then the default. A context file that exists but cannot be read or parsed
/// is an error rather than a silent fall-through, because falling through
/// would talk to some other cluster than the one the file names.
pub fn resolve(
    flag: Option<&str>,
    env: Option<&str>,
    context_file: &Path,
) -> anyhow::Result<Target> {
    if let Some(target) = Target::from_list(split_list(flag.unwrap_or("")), Source::Flag) {
        return Ok(target);
    }
    if let Some(target) = Target::from_list(split_list(env.unwrap_or("")), Source::Env) {
        return Ok(target);
    }
    match std::fs::read(context_file) {
        Ok(bytes) => {
            let context: ContextFile = serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "invalid context file {} (remove it, or pass --controller)",
                    context_file.display()
                )
            })?;
            let mut list: Vec<String> = context
                .controllers
                .iter()
                .map(|a| a.trim().to_string())
                .filter(|a| !a.is_empty())
                .collect();
            let single = context.controller.trim();
            if !single.is_empty() && !list.iter().any(|a| a == single) {
                list.insert(0, single.to_string());
            }
            let source = Source::Context {
                path: context_file.to_path_buf(),
                writer: context.source,
            };
            Target::from_list(list, source).ok_or_else(|| {
                anyhow::anyhow!(
                    "invalid context file {}: `controllers` and `controller` are empty",
                    context_file.display()
                )
            })
        }
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Target {
            address: DEFAULT_CONTROLLER.to_string(),
            source: Source::Default,
            fallbacks: Vec::new(),
        }),
        Err(err) => Err(err)
            .with_context(|| format!("cannot read the context file {}", context_file.display())),
    }
}

/// Where a controller says the leader is.
enum Leader {
    /// It does not know (or did not answer in time).
    Unknown,
    /// It leads (or is not replicated).
    Here,
    /// Elsewhere.
    At(String),
}

/// A connected client of the controller's `Control` service.
pub struct Client {
    /// The generated gRPC client.
    pub control: ControlClient<Channel>,
    /// Where it is connected to.
    pub target: Target,
    channel: Channel,
    /// The wait before the next failover attempt.
    backoff: Duration,
}

impl Client {
    /// Resolves the address (see [`resolve`]) and connects.
    pub async fn connect(flag: &ControllerFlag) -> anyhow::Result<Client> {
        let env = std::env::var(CONTROLLER_ENV).ok();
        let target = resolve(flag.0.as_deref(), env.as_deref(), &context_file())?;
        Self::connect_to(target).await
    }

    /// Connects to a resolved target: its first address that answers and
    /// knows a leader (a controller cut off from the majority answers, but
    /// could not take a write). With one address, just connects to it.
    pub async fn connect_to(target: Target) -> anyhow::Result<Client> {
        if target.fallbacks.is_empty() {
            return Self::connect_one(target, CONNECT_TIMEOUT).await;
        }
        let mut first_error = None;
        let mut leaderless = None;
        for address in target.addresses() {
            let one = Target {
                address,
                source: target.source.clone(),
                fallbacks: Vec::new(),
            };
            match Self::connect_one(one, FAILOVER_CONNECT_TIMEOUT).await {
                Ok(client) => match client.leader().await {
                    Leader::Unknown => {
                        leaderless.get_or_insert(client);
                    }
                    Leader::Here => return Ok(client.with_fallbacks(&target)),
                    Leader::At(leader) => {
                        // Logs and exec go through the leader's agent
                        // sessions: talk to it when it answers.
                        let at = Target {
                            address: leader,
                            source: target.source.clone(),
                            fallbacks: Vec::new(),
                        };
                        return Ok(
                            match Self::connect_one(at, FAILOVER_CONNECT_TIMEOUT).await {
                                Ok(leader) => leader.with_fallbacks(&target),
                                Err(_) => client.with_fallbacks(&target),
                            },
                        );
                    }
                },
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        // None knows a leader: the one that answered says why (no quorum).
        match (leaderless, first_error) {
            (Some(client), _) => Ok(client.with_fallbacks(&target)),
            (None, Some(e)) => Err(e),
            (None, None) => Err(anyhow::anyhow!("no controller address to connect to")),
        }
    }

    fn with_fallbacks(mut self, target: &Target) -> Client {
        self.target.fallbacks = target
            .addresses()
            .into_iter()
            .filter(|a| *a != self.target.address)
            .collect();
        self
    }

    /// Where the controller says the leader is (`ListControllers`, within
    /// the failover timeout). A controller without the service (an older
    /// one) counts as its own leader.
    async fn leader(&self) -> Leader {
        let mut cluster = ClusterClient::new(self.channel.clone());
        let mut request = gantry_proto::tonic::Request::new(gantry_proto::v1::Empty {});
        request.set_timeout(FAILOVER_CONNECT_TIMEOUT);
        match cluster.list_controllers(request).await {
            Ok(r) => {
                let list = r.into_inner();
                match list
                    .controllers
                    .iter()
                    .find(|c| c.raft_id == list.leader_id)
                {
                    _ if list.leader_id == 0 => Leader::Unknown,
                    Some(c) if c.is_self || c.address.is_empty() => Leader::Here,
                    Some(c) if c.address == self.target.address => Leader::Here,
                    Some(c) => Leader::At(c.address.clone()),
                    None => Leader::Here,
                }
            }
            Err(status) if status.code() == Code::Unimplemented => Leader::Here,
            Err(_) => Leader::Unknown,
        }
    }

    /// Whether this client may move to another controller: it knows more
    /// than one (a controller named alone is the user's choice).
    pub fn can_fail_over(&self) -> bool {
        !self.target.fallbacks.is_empty()
    }

    /// Moves to another controller after `failure` at this one: the leader
    /// named in `status`, else the first of the others that answers and
    /// knows a leader (this one last), waiting between rounds until
    /// `deadline`. Says so on stderr, as the command goes on there.
    pub async fn fail_over(
        &mut self,
        failure: &Failover,
        leader_hint: Option<String>,
        deadline: tokio::time::Instant,
    ) -> anyhow::Result<()> {
        let failed = self.target.address.clone();
        let mut others: Vec<String> = self.target.fallbacks.clone();
        if let Some(leader) = leader_hint.filter(|l| *l != failed) {
            others.retain(|a| *a != leader);
            others.insert(0, leader);
        }
        others.push(failed.clone());
        let target = Target {
            address: others[0].clone(),
            source: self.target.source.clone(),
            fallbacks: others[1..].to_vec(),
        };
        loop {
            match Client::connect_to(target.clone()).await {
                Ok(client) => {
                    eprintln!(
                        "gantry: the controller at {failed} failed ({}); going on with {}",
                        failure.why, client.target.address
                    );
                    let backoff = self.backoff;
                    *self = client;
                    self.backoff = backoff;
                    return Ok(());
                }
                Err(_) if tokio::time::Instant::now() + self.backoff >= deadline => {
                    anyhow::bail!(
                        "the controller at {failed} failed ({}) and no other controller \
                         could take over within {}s",
                        failure.why,
                        FAILOVER_BUDGET.as_secs()
                    );
                }
                Err(_) => self.back_off().await,
            }
        }
    }

    /// Waits before the next attempt: 100 ms, doubling to 1 s (an election
    /// takes 0.5–1 s; no need to hammer the survivors meanwhile).
    async fn back_off(&mut self) {
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(1));
    }

    /// Makes a call on the `Control` service, failing over to other
    /// controllers as [`Repeat`] allows (see the module documentation).
    /// The error is the last controller's status.
    pub async fn call<Req, T, F, Fut>(
        &mut self,
        repeat: Repeat,
        request: Req,
        f: F,
    ) -> Result<T, Status>
    where
        Req: Clone,
        F: FnMut(ControlClient<Channel>, Req) -> Fut,
        Fut: Future<Output = Result<gantry_proto::tonic::Response<T>, Status>>,
    {
        self.call_with(ControlClient::new, repeat, None, request, f)
            .await
    }

    /// A removal on the `Control` service: as [`Client::call`] with
    /// [`Repeat::Write`], and a NOT_FOUND from a repeat after an unknown
    /// outcome is success (what was asked holds; the first attempt may
    /// have done it), with the default answer and a note on stderr.
    pub async fn call_remove<Req, T, F, Fut>(&mut self, request: Req, f: F) -> Result<T, Status>
    where
        Req: Clone,
        T: Default,
        F: FnMut(ControlClient<Channel>, Req) -> Fut,
        Fut: Future<Output = Result<gantry_proto::tonic::Response<T>, Status>>,
    {
        self.call_with(
            ControlClient::new,
            Repeat::Write,
            Some(T::default),
            request,
            f,
        )
        .await
    }

    /// [`Client::call`] on the `Cluster` service; `gone` as in
    /// [`Client::call_remove`].
    pub async fn call_cluster<Req, T, F, Fut>(
        &mut self,
        repeat: Repeat,
        gone: Option<fn() -> T>,
        request: Req,
        f: F,
    ) -> Result<T, Status>
    where
        Req: Clone,
        F: FnMut(ClusterClient<Channel>, Req) -> Fut,
        Fut: Future<Output = Result<gantry_proto::tonic::Response<T>, Status>>,
    {
        self.call_with(ClusterClient::new, repeat, gone, request, f)
            .await
    }

    async fn call_with<S, Req, T, F, Fut>(
        &mut self,
        make: fn(Channel) -> S,
        repeat: Repeat,
        gone: Option<fn() -> T>,
        request: Req,
        mut f: F,
    ) -> Result<T, Status>
    where
        Req: Clone,
        F: FnMut(S, Req) -> Fut,
        Fut: Future<Output = Result<gantry_proto::tonic::Response<T>, Status>>,
    {
        let deadline = tokio::time::Instant::now() + FAILOVER_BUDGET;
        let mut unknown = false;
        let mut first = true;
        loop {
            if !first {
                self.back_off().await;
            }
            first = false;
            let status = match f(make(self.channel.clone()), request.clone()).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) => status,
            };
            if unknown
                && status.code() == Code::NotFound
                && let Some(gone) = gone
            {
                eprintln!(
                    "gantry: {} (an earlier attempt, whose controller failed under it, may have removed it: its outcome is unknown)",
                    status.message()
                );
                return Ok(gone());
            }
            let Some(failure) = failover_of(&status) else {
                return Err(status);
            };
            if !self.can_fail_over() {
                return Err(status);
            }
            unknown |= failure.maybe_applied && repeat != Repeat::Read;
            if tokio::time::Instant::now() >= deadline {
                return Err(status);
            }
            let hint = leader_of(&status);
            if let Err(e) = self.fail_over(&failure, hint, deadline).await {
                eprintln!("gantry: {e:#}");
                return Err(status);
            }
        }
    }

    async fn connect_one(target: Target, timeout: Duration) -> anyhow::Result<Client> {
        let endpoint = Endpoint::from_shared(format!("http://{}", target.address))
            .map_err(|err| {
                UsageError(format!(
                    "invalid controller address `{}` (from {}): {err} (expected HOST:PORT)",
                    target.address, target.source
                ))
            })?
            .connect_timeout(timeout)
            .tcp_nodelay(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|err| unreachable(&target, &error_chain(&err)))?;
        Ok(Client {
            control: ControlClient::new(channel.clone()),
            channel,
            target,
            backoff: Duration::from_millis(100),
        })
    }

    /// Turns a failed call into the error the user sees, with its exit code
    /// (see the module documentation).
    pub fn error(&self, status: Status) -> anyhow::Error {
        status_error(&self.target, status)
    }

    /// After `status` broke a stream (logs, events, a wait): moves to
    /// another controller within [`FAILOVER_BUDGET`] when the failure is
    /// one to fail over from and other controllers are known, so that the
    /// caller opens the stream again there; else `status` as the error.
    pub async fn fail_over_stream(&mut self, status: Status) -> anyhow::Result<()> {
        let failure = match failover_of(&status) {
            Some(f) if self.can_fail_over() => f,
            _ => return Err(self.error(status)),
        };
        let deadline = tokio::time::Instant::now() + FAILOVER_BUDGET;
        if self
            .fail_over(&failure, leader_of(&status), deadline)
            .await
            .is_err()
        {
            return Err(self.error(status));
        }
        Ok(())
    }
}

/// A stream the controller ended before the command was done (a controller
/// that shuts down ends its streams), as a status that fails over.
pub fn stream_ended(what: &str) -> Status {
    let mut status = Status::unavailable(format!("the controller ended the {what} stream"));
    status.metadata_mut().insert(
        gantry_controller::server::replication::RETRY_METADATA,
        gantry_proto::tonic::metadata::MetadataValue::from_static("stream-ended"),
    );
    status
}

/// The leader a controller's refusal names (`gantry-leader`), if any.
pub fn leader_of(status: &Status) -> Option<String> {
    status
        .metadata()
        .get(gantry_controller::server::replication::LEADER_METADATA)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .filter(|l| !l.is_empty())
}

/// Maps a gRPC status to an error: bad input (exit 2), an unreachable
/// controller (exit 1, with a hint), or another failure (exit 1).
pub fn status_error(target: &Target, status: Status) -> anyhow::Error {
    let message = status.message().to_string();
    // Only a status made on this side from a transport error has a source
    // (a refused reconnect, a connection lost mid-stream, which tonic reports
    // as UNAVAILABLE or UNKNOWN); a status the controller sent has none, so
    // its own UNAVAILABLE (a task's node is not connected) stays an answer.
    let cause = std::error::Error::source(&status).map(error_chain);
    match (status.code(), cause) {
        (code, _) if is_bad_input(code) => UsageError(message).into(),
        (_, Some(cause)) => unreachable(target, &format!("{message}: {cause}")),
        (code, None) => anyhow::anyhow!(
            "the controller at {} answered {}: {message}",
            target.address,
            code_name(code)
        ),
    }
}

/// Whether a status code means bad input (exit 2).
pub fn is_bad_input(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument | Code::NotFound | Code::FailedPrecondition | Code::AlreadyExists
    )
}

fn unreachable(target: &Target, why: &str) -> anyhow::Error {
    let mut message = format!(
        "cannot reach the controller at {} (from {}): {why}\n\
         hint: start one with `gantry up` (this machine) or `gantry dev cluster up` \
         (a local cluster), or point at one with --controller HOST:PORT or {CONTROLLER_ENV}",
        target.address, target.source
    );
    // A context file outlives a cluster killed without `down`: say so,
    // since nothing else would point at it.
    if let Source::Context { path, .. } = &target.source {
        message.push_str(&format!(
            "\nhint: if that cluster is gone, remove the stale {}",
            path.display()
        ));
    }
    anyhow::anyhow!(message)
}

/// A transport error's whole chain on one line: tonic's top-level message
/// ("transport error") says nothing about why.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// The gRPC name of a code (`DEADLINE_EXCEEDED`), as the spec writes it.
fn code_name(code: Code) -> String {
    let debug = format!("{code:?}");
    let mut out = String::new();
    for (i, c) in debug.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// Runs a client command's future on a current-thread runtime built here:
/// `main` stays synchronous and thread-free (ARCHITECTURE.md), and a client
/// needs no more than one thread.
pub fn block_on<F: Future>(future: F) -> anyhow::Result<F::Output> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let output = runtime.block_on(future);
    // Dropping a runtime waits for its blocking threads, and `exec -i` may
    // leave one blocked reading our stdin after the process has ended.
    runtime.shutdown_background();
    Ok(output)
}

/// Converts a message from the controller into the model type, naming what
/// it was if the controller sent something this client cannot read (a
/// version mismatch or a bug, never the user's fault: exit 1).
pub fn from_wire<W, D>(value: W, what: &str) -> anyhow::Result<D>
where
    D: TryFrom<W, Error = gantry_controller::wire::WireError>,
{
    D::try_from(value).with_context(|| format!("the controller sent an invalid {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("context.json");
        std::fs::write(&path, body).unwrap();
        path
    }

    #[test]
    fn the_flag_wins_over_everything() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = write(dir.path(), r#"{"controller": "10.0.0.1:7070"}"#);
        let t = resolve(Some("1.2.3.4:1"), Some("5.6.7.8:2"), &ctx).unwrap();
        assert_eq!(t.address, "1.2.3.4:1");
        assert_eq!(t.source, Source::Flag);
    }

    #[test]
    fn the_environment_wins_over_the_context_file() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = write(dir.path(), r#"{"controller": "10.0.0.1:7070"}"#);
        let t = resolve(None, Some("5.6.7.8:2"), &ctx).unwrap();
        assert_eq!(t.address, "5.6.7.8:2");
        assert_eq!(t.source, Source::Env);
        // An empty variable is as good as unset (`GANTRY_CONTROLLER= gantry ...`).
        let t = resolve(None, Some(""), &ctx).unwrap();
        assert_eq!(t.address, "10.0.0.1:7070");
    }

    #[test]
    fn the_context_file_names_its_writer() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = write(
            dir.path(),
            r#"{"controller": "10.251.0.2:7070", "source": "dev cluster gantry"}"#,
        );
        let t = resolve(None, None, &ctx).unwrap();
        assert_eq!(t.address, "10.251.0.2:7070");
        assert_eq!(
            t.source.to_string(),
            format!("{}, written by dev cluster gantry", ctx.display())
        );
        let text = unreachable(&t, "refused").to_string();
        assert!(
            text.contains(&format!("remove the stale {}", ctx.display())),
            "{text}"
        );
    }

    #[test]
    fn a_context_file_lists_every_controller_and_the_old_key_still_works() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = write(
            dir.path(),
            r#"{"controllers": ["10.0.0.1:7070", "10.0.0.2:7070"], "controller": "10.0.0.1:7070"}"#,
        );
        let t = resolve(None, None, &ctx).unwrap();
        assert_eq!(t.addresses(), ["10.0.0.1:7070", "10.0.0.2:7070"]);
        let ctx = write(dir.path(), r#"{"controller": "10.0.0.3:7070"}"#);
        let t = resolve(None, None, &ctx).unwrap();
        assert_eq!(t.addresses(), ["10.0.0.3:7070"]);
        let t = resolve(Some("a:1, b:2"), None, &ctx).unwrap();
        assert_eq!(t.addresses(), ["a:1", "b:2"]);
        let ctx = write(dir.path(), r#"{"controllers": []}"#);
        assert!(resolve(None, None, &ctx).is_err());
    }

    #[test]
    fn no_configuration_means_the_local_default() {
        let dir = tempfile::tempdir().unwrap();
        let t = resolve(None, None, &dir.path().join("absent.json")).unwrap();
        assert_eq!(t.address, DEFAULT_CONTROLLER);
        assert_eq!(t.source.to_string(), "the default");
    }

    #[test]
    fn a_broken_context_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = write(dir.path(), "{not json");
        let err = resolve(None, None, &ctx).unwrap_err();
        assert!(
            format!("{err:#}").contains(&ctx.display().to_string()),
            "{err:#}"
        );
    }

    #[test]
    fn bad_input_codes_exit_2_and_others_exit_1() {
        let target = Target {
            address: "127.0.0.1:1".into(),
            source: Source::Default,
            fallbacks: Vec::new(),
        };
        for code in [
            Code::InvalidArgument,
            Code::NotFound,
            Code::FailedPrecondition,
            Code::AlreadyExists,
        ] {
            let err = status_error(&target, Status::new(code, "no such service `web`"));
            assert!(err.downcast_ref::<UsageError>().is_some(), "{code:?}");
            assert_eq!(err.to_string(), "no such service `web`");
        }
        let err = status_error(&target, Status::new(Code::Internal, "disk full"));
        assert!(err.downcast_ref::<UsageError>().is_none());
        assert_eq!(
            err.to_string(),
            "the controller at 127.0.0.1:1 answered INTERNAL: disk full"
        );
        let mut status = Status::new(Code::Unavailable, "transport error");
        status.set_source(std::sync::Arc::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        )));
        let text = status_error(&target, status).to_string();
        assert!(
            text.starts_with(
                "cannot reach the controller at 127.0.0.1:1 (from the default): \
                 transport error: connection refused"
            ),
            "{text}"
        );
        assert!(text.contains("gantry up") && text.contains("gantry dev cluster up"));
        // A connection lost mid-stream: tonic says UNKNOWN, with the cause.
        let mut status = Status::new(Code::Unknown, "h2 protocol error");
        status.set_source(std::sync::Arc::new(std::io::Error::other(
            "error reading a body from connection",
        )));
        let text = status_error(&target, status).to_string();
        assert!(
            text.starts_with(
                "cannot reach the controller at 127.0.0.1:1 (from the default): \
                 h2 protocol error: error reading a body from connection"
            ),
            "{text}"
        );
        // The controller's own UNAVAILABLE (no session with the task's node).
        let err = status_error(
            &target,
            Status::new(Code::Unavailable, "node n1 is not connected"),
        );
        assert_eq!(
            err.to_string(),
            "the controller at 127.0.0.1:1 answered UNAVAILABLE: node n1 is not connected"
        );
    }

    #[test]
    fn failover_is_for_a_failed_controller_and_says_whether_a_write_may_have_applied() {
        // The controller's own "not here, not now" (no leader, no quorum):
        // another controller may serve it; a write may have been proposed.
        let mut status = Status::unavailable("no quorum: 1 of 3 controllers reachable");
        status.metadata_mut().insert(
            gantry_controller::server::replication::RETRY_METADATA,
            gantry_proto::tonic::metadata::MetadataValue::from_static("another-controller"),
        );
        let f = failover_of(&status).expect("fails over");
        assert!(f.maybe_applied && f.why.contains("no quorum"), "{f:?}");
        assert!(failover_of(&stream_ended("event")).is_some());
        // An answer about something else stays an answer.
        assert_eq!(
            failover_of(&Status::unavailable("node n1 is not connected")),
            None
        );
        assert_eq!(failover_of(&Status::not_found("no such service")), None);
        // A refused connect sent nothing; a reset may have come after the
        // request.
        let mut refused = Status::unavailable("transport error");
        refused.set_source(std::sync::Arc::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused",
        )));
        assert!(!failover_of(&refused).expect("fails over").maybe_applied);
        let mut reset = Status::unknown("h2 protocol error");
        reset.set_source(std::sync::Arc::new(std::io::Error::other(
            "connection reset by peer",
        )));
        assert!(failover_of(&reset).expect("fails over").maybe_applied);
    }

    #[test]
    fn an_unreachable_controller_is_reported_with_address_and_source() {
        // Port 1 on loopback: nothing listens there, the connect is refused.
        let target = Target {
            address: "127.0.0.1:1".into(),
            source: Source::Env,
            fallbacks: Vec::new(),
        };
        let err = block_on(Client::connect_to(target)).unwrap().err().unwrap();
        let text = err.to_string();
        assert!(
            text.starts_with(
                "cannot reach the controller at 127.0.0.1:1 (from GANTRY_CONTROLLER): "
            ),
            "{text}"
        );
    }
}
