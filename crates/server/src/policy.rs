//! Per-method policy: which authenticated user may call which gRPC method, and which calls
//! need a fresh one-time code (step-up).
//!
//! The gate decides who may open a connection; a [`Policy`] decides, call by call, what an
//! authenticated connection may do. It is a list of [`Rule`]s, each for one full method
//! (`/portcullis.demo.v1.Echo/Say`), one service (`portcullis.demo.v1.Echo`: every method of
//! it) or every method (`*`). For a call, the most specific rule applies, alone: a method rule
//! over a service rule over the `*` rule. A method rule does not inherit the conditions of
//! its service's rule. A call no rule matches is allowed (the connection is authenticated).
//!
//! A rule passes a call when all of its conditions hold, checked in this order:
//!
//! 1. the user is not in `deny_users`;
//! 2. `allow_users` is empty, or the user is in it;
//! 3. `roles` is empty, or the user has at least one of them ([`AuthContext::roles`]: the
//!    roles the registry held when the connection was decided, kept current by the server's
//!    revocation round every 250 ms, so that no call reads the registry; roles that no round
//!    could confirm for [`ROLES_MAX_AGE`] are not used);
//! 4. `fresh_totp_secs` is unset, or the connection's TOTP check (for a session: the check
//!    that earned the session, [`AuthContext::totp_time_ms`]) is at most that many seconds old.
//!
//! A service account ([`portcullis_core::UserRecord::service`]: no TOTP, its devices are let
//! in on their key alone) may call only what the policy lists for it: besides the conditions
//! above, the rule for the call must name the account in `allow_users` or one of its roles in
//! `roles` ([`Policy::decide_as_service`]). Without such a rule the call is refused with
//! PERMISSION_DENIED, `policy_denied: service account NAME may only call the methods its
//! policy lists`. Condition 4 does not hold a service account back, however old its
//! connection: it has no code to give, and the rule that lists it grants it the method.
//!
//! A refusal never reaches the service. It answers with a status whose message starts with
//! the reason's name, and the metadata `portcullis-reject` carrying that name:
//!
//! | refusal | gRPC status | `portcullis-reject` |
//! |---|---|---|
//! | conditions 1 to 3 | PERMISSION_DENIED | `policy_denied` |
//! | condition 4 | UNAUTHENTICATED | `step_up_required` |
//! | the roles are not known: not confirmed by the registry for [`ROLES_MAX_AGE`] | UNAVAILABLE | `policy_unavailable` |
//!
//! A Portcullis client answers `step_up_required` by itself: it opens a new connection with a
//! fresh code and sends the call again.
//!
//! Policies are usually written in TOML (see `docs/POLICY.md`):
//!
//! ```
//! use portcullis_server::policy::Policy;
//!
//! let policy = Policy::from_toml_str(r#"
//!     [[rule]]
//!     method = "/portcullis.demo.v1.Echo/Say"
//!     fresh_totp_secs = 300
//!     roles = ["admin"]
//!
//!     [[rule]]
//!     service = "portcullis.demo.v1.Echo"
//!     deny_users = ["mallory"]
//! "#)?;
//! assert_eq!(policy.rules().len(), 2);
//! # Ok::<(), portcullis_server::policy::PolicyError>(())
//! ```
//!
//! and put behind the Portcullis layer, so that requests carry their [`AuthContext`]:
//!
//! ```no_run
//! # fn f(portcullis: portcullis_server::PortcullisServer) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use portcullis_server::policy::{Policy, PolicyLayer};
//!
//! let policy = Policy::from_toml_file("policy.toml")?;
//! let layer = PolicyLayer::new(policy, Arc::new(portcullis_core::SystemClock));
//! let server = portcullis.server().layer(layer); // then add_service, serve_with_incoming
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use portcullis_core::{Clock, RegistryError};
use serde::Deserialize;
use tonic::body::Body;
use tonic::metadata::MetadataValue;
use tower::{Layer, Service};

use crate::context::AuthContext;

/// The metadata key that names the reason of a refusal.
pub const REJECT_METADATA: &str = "portcullis-reject";

/// The longest `fresh_totp_secs` a rule may ask for: one year.
pub const MAX_FRESH_TOTP_SECS: u64 = 365 * 24 * 3600;

/// Why a policy could not be loaded. The message is one line naming the file (or `policy`
/// for a string) and, where known, the line.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("{path}: cannot read the policy file: {source}")]
    Read {
        /// The file.
        path: String,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid TOML, has an unknown key, a value of the wrong type, or a rule
    /// that does not make sense.
    #[error("{origin}{}: {message}", line.map(|l| format!(", line {l}")).unwrap_or_default())]
    Invalid {
        /// The file, or `policy` for a string.
        origin: String,
        /// The line (from 1), when known.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
}

/// What a rule applies to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RuleTarget {
    /// One method, as its HTTP/2 path: `/package.Service/Method`.
    Method(String),
    /// Every method of one service, by its full name: `package.Service`.
    Service(String),
    /// Every method.
    All,
}

impl RuleTarget {
    /// A method given as `/package.Service/Method` (the leading `/` may be left out).
    pub fn method(method: &str) -> Result<Self, String> {
        let bare = method.strip_prefix('/').unwrap_or(method);
        let valid = bare.split_once('/').is_some_and(|(service, name)| {
            valid_name(service) && !name.is_empty() && valid_name(name) && !name.contains('.')
        });
        if !valid {
            return Err(format!(
                "method `{method}` is not of the form /package.Service/Method"
            ));
        }
        Ok(Self::Method(format!("/{bare}")))
    }

    /// A service given as `package.Service` or `/package.Service/`, or `*` for every method.
    pub fn service(service: &str) -> Result<Self, String> {
        if service == "*" {
            return Ok(Self::All);
        }
        let bare = service.strip_prefix('/').unwrap_or(service);
        let bare = bare.strip_suffix('/').unwrap_or(bare);
        if !valid_name(bare) {
            return Err(format!(
                "service `{service}` is not of the form package.Service (or `*`)"
            ));
        }
        Ok(Self::Service(bare.to_owned()))
    }

    fn specificity(&self) -> u8 {
        match self {
            Self::Method(_) => 2,
            Self::Service(_) => 1,
            Self::All => 0,
        }
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            Self::Method(method) => method == path,
            Self::Service(service) => path
                .strip_prefix('/')
                .and_then(|rest| rest.strip_prefix(service.as_str()))
                .is_some_and(|rest| rest.starts_with('/')),
            Self::All => true,
        }
    }
}

impl fmt::Display for RuleTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Method(m) => write!(f, "method {m}"),
            Self::Service(s) => write!(f, "service {s}"),
            Self::All => f.write_str("service *"),
        }
    }
}

/// A dotted protobuf name: letters, digits, `_` and `.`, not empty, no empty part.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|part| {
            !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
}

/// One rule of a [`Policy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// What the rule applies to.
    pub target: RuleTarget,
    /// The oldest TOTP check the call accepts (step-up); `None`: any.
    pub fresh_totp: Option<Duration>,
    /// The user needs at least one of these roles; empty: no role needed.
    pub roles: Vec<String>,
    /// Only these users may call; empty: any user.
    pub allow_users: Vec<String>,
    /// These users may not call.
    pub deny_users: Vec<String>,
}

impl Rule {
    /// A rule with no condition (allows every authenticated user) for `target`.
    pub fn new(target: RuleTarget) -> Self {
        Self {
            target,
            fresh_totp: None,
            roles: Vec::new(),
            allow_users: Vec::new(),
            deny_users: Vec::new(),
        }
    }

    /// Requires a TOTP check no older than `max_age`.
    pub fn fresh_totp(mut self, max_age: Duration) -> Self {
        self.fresh_totp = Some(max_age);
        self
    }

    /// Requires one of `roles`.
    pub fn roles<I: IntoIterator<Item = S>, S: Into<String>>(mut self, roles: I) -> Self {
        self.roles = roles.into_iter().map(Into::into).collect();
        self
    }

    /// Lets only `users` call.
    pub fn allow_users<I: IntoIterator<Item = S>, S: Into<String>>(mut self, users: I) -> Self {
        self.allow_users = users.into_iter().map(Into::into).collect();
        self
    }

    /// Refuses `users`.
    pub fn deny_users<I: IntoIterator<Item = S>, S: Into<String>>(mut self, users: I) -> Self {
        self.deny_users = users.into_iter().map(Into::into).collect();
        self
    }
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The user may not make this call (PERMISSION_DENIED, `policy_denied`).
    Denied(String),
    /// The call needs a TOTP check from the last `max_age` (UNAUTHENTICATED,
    /// `step_up_required`).
    StepUp {
        /// The oldest TOTP check the call accepts.
        max_age: Duration,
    },
    /// The registry could not say which roles the user has (UNAVAILABLE,
    /// `policy_unavailable`): the call is refused, not waved through.
    Unavailable(String),
}

impl Refusal {
    /// The reason's name, sent as `portcullis-reject`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Denied(_) => "policy_denied",
            Self::StepUp { .. } => "step_up_required",
            Self::Unavailable(_) => "policy_unavailable",
        }
    }

    /// The status a client receives.
    pub fn to_status(&self) -> tonic::Status {
        let mut status = match self {
            Self::Denied(why) => tonic::Status::permission_denied(format!("policy_denied: {why}")),
            Self::StepUp { max_age } => tonic::Status::unauthenticated(format!(
                "step_up_required: this call needs a one-time code from the last {} s",
                max_age.as_secs()
            )),
            Self::Unavailable(why) => {
                tonic::Status::unavailable(format!("policy_unavailable: {why}"))
            }
        };
        status
            .metadata_mut()
            .insert(REJECT_METADATA, MetadataValue::from_static(self.name()));
        status
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.to_status().message())
    }
}

/// Per-method rules; see the [module documentation](self). The default has no rule: every
/// authenticated call is allowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    rules: Vec<Rule>,
}

/// The TOML file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    rule: Vec<toml::Spanned<RuleFile>>,
}

/// One `[[rule]]` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    method: Option<String>,
    service: Option<String>,
    fresh_totp_secs: Option<u64>,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    allow_users: Vec<String>,
    #[serde(default)]
    deny_users: Vec<String>,
}

/// The line (from 1) of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

impl Policy {
    /// A policy with no rule.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a rule. Fails when a rule for the same target exists, or the rule names an
    /// empty role or user.
    pub fn with_rule(mut self, rule: Rule) -> Result<Self, PolicyError> {
        self.push(rule).map_err(|message| PolicyError::Invalid {
            origin: "policy".into(),
            line: None,
            message,
        })?;
        Ok(self)
    }

    fn push(&mut self, rule: Rule) -> Result<(), String> {
        if self.rules.iter().any(|r| r.target == rule.target) {
            return Err(format!("a second rule for {}", rule.target));
        }
        for (key, names) in [
            ("roles", &rule.roles),
            ("allow_users", &rule.allow_users),
            ("deny_users", &rule.deny_users),
        ] {
            if names.iter().any(|n| n.is_empty()) {
                return Err(format!("{key} holds an empty name"));
            }
        }
        if let Some(max_age) = rule.fresh_totp
            && (max_age.as_secs() == 0 || max_age.as_secs() > MAX_FRESH_TOTP_SECS)
        {
            return Err(format!(
                "fresh_totp_secs must be between 1 and {MAX_FRESH_TOTP_SECS}"
            ));
        }
        self.rules.push(rule);
        Ok(())
    }

    /// Reads a policy from the TOML file at `path`. Errors name the file and the line.
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Self, PolicyError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Reads a policy from TOML text. Errors name `policy` and the line.
    pub fn from_toml_str(text: &str) -> Result<Self, PolicyError> {
        Self::parse(text, "policy")
    }

    fn parse(text: &str, origin: &str) -> Result<Self, PolicyError> {
        let invalid = |line: Option<usize>, message: String| PolicyError::Invalid {
            origin: origin.to_owned(),
            line,
            message,
        };
        let file: PolicyFile = toml::from_str(text).map_err(|e| {
            let message = e.message().trim().replace('\n', " ");
            invalid(e.span().map(|s| line_of(text, s.start)), message)
        })?;
        let mut policy = Self::default();
        let mut lines = HashMap::new();
        for spanned in file.rule {
            let line = line_of(text, spanned.span().start);
            let raw = spanned.into_inner();
            let target = match (raw.method, raw.service) {
                (Some(method), None) => RuleTarget::method(&method),
                (None, Some(service)) => RuleTarget::service(&service),
                (Some(_), Some(_)) => {
                    Err("a rule has either `method` or `service`, not both".to_owned())
                }
                (None, None) => Err("a rule needs `method` or `service`".to_owned()),
            }
            .map_err(|m| invalid(Some(line), m))?;
            if let Some(first) = lines.get(&target) {
                return Err(invalid(
                    Some(line),
                    format!("a second rule for {target} (the first is on line {first})"),
                ));
            }
            lines.insert(target.clone(), line);
            let rule = Rule {
                target,
                fresh_totp: raw.fresh_totp_secs.map(Duration::from_secs),
                roles: raw.roles,
                allow_users: raw.allow_users,
                deny_users: raw.deny_users,
            };
            policy.push(rule).map_err(|m| invalid(Some(line), m))?;
        }
        Ok(policy)
    }

    /// The rules, in the order given.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The rule that applies to a call of `path` (`/package.Service/Method`): the most
    /// specific that matches, if any.
    pub fn rule_for(&self, path: &str) -> Option<&Rule> {
        self.rules
            .iter()
            .filter(|r| r.target.matches(path))
            .max_by_key(|r| r.target.specificity())
    }

    /// Decides a call of `path` by `user`, whose connection's TOTP check was made at
    /// `totp_time_ms`, at `now_ms`. `roles` is asked only when the rule needs roles.
    pub fn decide(
        &self,
        path: &str,
        user: &str,
        totp_time_ms: u64,
        now_ms: u64,
        roles: impl FnOnce() -> Result<Vec<String>, RegistryError>,
    ) -> Result<(), Refusal> {
        self.check(path, user, Some((totp_time_ms, now_ms)), roles)
    }

    /// Decides a call of `path` by the service account `user` holding `roles`: conditions 1
    /// to 3 of the [module](self) as for anyone, not condition 4 (`fresh_totp_secs`: a service
    /// account has no code to give, and the rule that lists it grants it the method), then
    /// [`Policy::decide_service`].
    pub fn decide_as_service(
        &self,
        path: &str,
        user: &str,
        roles: Result<Vec<String>, RegistryError>,
    ) -> Result<(), Refusal> {
        let listed = roles.clone().unwrap_or_default();
        self.check(path, user, None, || roles)?;
        self.decide_service(path, user, &listed)
    }

    /// Conditions 1 to 3, and condition 4 when `fresh` gives the TOTP check's time and now.
    fn check(
        &self,
        path: &str,
        user: &str,
        fresh: Option<(u64, u64)>,
        roles: impl FnOnce() -> Result<Vec<String>, RegistryError>,
    ) -> Result<(), Refusal> {
        let Some(rule) = self.rule_for(path) else {
            return Ok(());
        };
        if rule.deny_users.iter().any(|u| u == user) {
            return Err(Refusal::Denied(format!("user {user} may not call {path}")));
        }
        if !rule.allow_users.is_empty() && !rule.allow_users.iter().any(|u| u == user) {
            return Err(Refusal::Denied(format!(
                "user {user} is not among the users allowed to call {path}"
            )));
        }
        if !rule.roles.is_empty() {
            let held = roles().map_err(|e| {
                tracing::warn!(user, error = %e, "policy: cannot read the user's roles");
                Refusal::Unavailable(format!(
                    "the roles of user {user} could not be read; try again later"
                ))
            })?;
            if !rule.roles.iter().any(|r| held.contains(r)) {
                return Err(Refusal::Denied(format!(
                    "{path} needs the role {}; user {user} has none of them",
                    rule.roles.join(" or ")
                )));
            }
        }
        if let (Some(max_age), Some((totp_time_ms, now_ms))) = (rule.fresh_totp, fresh) {
            let max_ms = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX);
            if now_ms.saturating_sub(totp_time_ms) > max_ms {
                return Err(Refusal::StepUp { max_age });
            }
        }
        Ok(())
    }
}

impl Policy {
    /// The listing part of [`Policy::decide_as_service`]: a service account may call only what a policy lists for
    /// it, so the call is allowed only when the rule for `path` names the user in
    /// `allow_users` or one of its roles in `roles`. No rule, or a rule that lets everyone in,
    /// is not enough.
    pub fn decide_service(&self, path: &str, user: &str, roles: &[String]) -> Result<(), Refusal> {
        let listed = self.rule_for(path).is_some_and(|rule| {
            rule.allow_users.iter().any(|u| u == user)
                || rule.roles.iter().any(|r| roles.contains(r))
        });
        if listed {
            Ok(())
        } else {
            Err(Refusal::Denied(format!(
                "service account {user} may only call the methods its policy lists"
            )))
        }
    }
}

/// A tower layer for tonic's `Server::layer` that applies a [`Policy`] to every call.
///
/// Put it after the Portcullis layer (`portcullis.server().layer(policy_layer)`: tonic runs
/// layers in the order they are added), which gives requests their [`AuthContext`]. A request
/// without one is answered UNAUTHENTICATED (fail closed). Refused calls never reach the
/// service; see the [module documentation](self) for the answers.
#[derive(Clone)]
pub struct PolicyLayer {
    shared: Arc<Shared>,
}

struct Shared {
    policy: Policy,
    clock: Arc<dyn Clock>,
}

impl PolicyLayer {
    /// A layer that applies `policy`, judging the age of TOTP checks by `clock` (use the clock
    /// the server's gate uses). What it needs of the user (roles, service account, TOTP time)
    /// travels with the connection's [`AuthContext`]: no call reads the registry.
    pub fn new(policy: Policy, clock: Arc<dyn Clock>) -> Self {
        Self {
            shared: Arc::new(Shared { policy, clock }),
        }
    }

    /// The policy applied.
    pub fn policy(&self) -> &Policy {
        &self.shared.policy
    }
}

impl fmt::Debug for PolicyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyLayer")
            .field("policy", &self.shared.policy)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for PolicyLayer {
    type Service = PolicyService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PolicyService {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service made by [`PolicyLayer`].
#[derive(Clone)]
pub struct PolicyService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: fmt::Debug> fmt::Debug for PolicyService<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyService")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

/// The oldest roles a call that needs them is decided on: 20 revocation rounds. Older roles
/// mean the registry has not answered for that long, and such a call is refused
/// `policy_unavailable` instead of being decided on roles that may have been taken away.
pub const ROLES_MAX_AGE: Duration = Duration::from_secs(5);

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S> Service<Request<Body>> for PolicyService<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let Some(auth) = request.extensions().get::<AuthContext>() else {
            let status =
                tonic::Status::unauthenticated("no Portcullis authentication on this connection");
            return Box::pin(async move { Ok(status.into_http()) });
        };
        let shared = &self.shared;
        let path = request.uri().path();
        // Roles the revocation rounds could not confirm for long (the registry does not
        // answer) are not trusted: a call that needs them is refused UNAVAILABLE.
        let roles = auth.roles_confirmed_within(ROLES_MAX_AGE);
        let held = || match &roles {
            Ok(roles) => Ok(roles.to_vec()),
            Err(age) => Err(RegistryError::Backend(format!(
                "the roles were last read {} s ago",
                age.as_secs()
            ))),
        };
        // A service account may call only the methods a rule grants it by name or role (by
        // name alone while its roles are not confirmed: fail closed), however old its
        // connection.
        let decision = if auth.service {
            shared.policy.decide_as_service(path, &auth.user, held())
        } else {
            shared.policy.decide(
                path,
                &auth.user,
                auth.totp_time_ms,
                shared.clock.now_ms(),
                held,
            )
        };
        if let Err(refusal) = decision {
            tracing::info!(
                target: "portcullis::policy",
                user = %auth.user,
                device = %auth.device_name,
                method = path,
                reference = %auth.reference,
                reason = refusal.name(),
                "call refused by policy"
            );
            let status = refusal.to_status();
            return Box::pin(async move { Ok(status.into_http()) });
        }
        // Call the service that poll_ready readied, and keep a fresh clone for the next call.
        let clone = self.inner.clone();
        let mut ready = std::mem::replace(&mut self.inner, clone);
        Box::pin(ready.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAY: &str = "/portcullis.demo.v1.Echo/Say";

    fn no_roles() -> Result<Vec<String>, RegistryError> {
        Ok(Vec::new())
    }

    #[test]
    fn the_most_specific_rule_wins() {
        let policy = Policy::from_toml_str(
            r#"
            [[rule]]
            service = "*"
            deny_users = ["eve"]
            [[rule]]
            service = "portcullis.demo.v1.Echo"
            deny_users = ["mallory"]
            [[rule]]
            method = "/portcullis.demo.v1.Echo/Say"
            allow_users = ["alice", "mallory"]
            "#,
        )
        .unwrap();
        assert_eq!(
            policy.rule_for(SAY).unwrap().target,
            RuleTarget::Method(SAY.into())
        );
        assert_eq!(
            policy
                .rule_for("/portcullis.demo.v1.Echo/Other")
                .unwrap()
                .target,
            RuleTarget::Service("portcullis.demo.v1.Echo".into())
        );
        // A service prefix matches whole names only.
        assert_eq!(
            policy
                .rule_for("/portcullis.demo.v1.EchoMore/Say")
                .unwrap()
                .target,
            RuleTarget::All
        );
        // The method rule alone applies: mallory passes it, bob does not.
        assert!(policy.decide(SAY, "mallory", 0, 0, no_roles).is_ok());
        assert!(matches!(
            policy.decide(SAY, "bob", 0, 0, no_roles),
            Err(Refusal::Denied(m)) if m.contains("bob")
        ));
        assert!(matches!(
            policy.decide("/portcullis.demo.v1.Echo/Other", "mallory", 0, 0, no_roles),
            Err(Refusal::Denied(_))
        ));
        assert!(
            policy
                .decide("/portcullis.demo.v1.Echo/Other", "eve", 0, 0, no_roles)
                .is_ok()
        );
        assert!(policy.decide("/x.Y/Z", "eve", 0, 0, no_roles).is_err());
        assert!(Policy::new().decide(SAY, "eve", 0, 0, no_roles).is_ok());
    }

    #[test]
    fn step_up_compares_the_totp_time_with_now() {
        let policy = Policy::new()
            .with_rule(
                Rule::new(RuleTarget::method(SAY).unwrap()).fresh_totp(Duration::from_secs(300)),
            )
            .unwrap();
        assert!(policy.decide(SAY, "a", 1_000, 301_000, no_roles).is_ok());
        let refusal = policy
            .decide(SAY, "a", 1_000, 301_001, no_roles)
            .unwrap_err();
        assert_eq!(
            refusal,
            Refusal::StepUp {
                max_age: Duration::from_secs(300)
            }
        );
        let status = refusal.to_status();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
        assert_eq!(
            status.message(),
            "step_up_required: this call needs a one-time code from the last 300 s"
        );
        assert_eq!(
            status.metadata().get(REJECT_METADATA).unwrap(),
            "step_up_required"
        );
    }

    #[test]
    fn roles_are_read_only_when_needed_and_failures_refuse() {
        let policy = Policy::new()
            .with_rule(
                Rule::new(RuleTarget::service("portcullis.demo.v1.Echo").unwrap())
                    .roles(["admin", "ops"]),
            )
            .unwrap()
            .with_rule(Rule::new(RuleTarget::method("/other.S/M").unwrap()))
            .unwrap();
        assert!(
            policy
                .decide(SAY, "a", 0, 0, || Ok(vec!["ops".into()]))
                .is_ok()
        );
        let denied = policy
            .decide(SAY, "a", 0, 0, || Ok(vec!["dev".into()]))
            .unwrap_err();
        let status = denied.to_status();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(
            status.message().starts_with("policy_denied: "),
            "{}",
            status.message()
        );
        assert_eq!(
            status.metadata().get(REJECT_METADATA).unwrap(),
            "policy_denied"
        );
        let broken = policy
            .decide(SAY, "a", 0, 0, || {
                Err(RegistryError::Backend("down".into()))
            })
            .unwrap_err();
        assert_eq!(broken.to_status().code(), tonic::Code::Unavailable);
        assert!(
            policy
                .decide("/other.S/M", "a", 0, 0, || panic!("roles asked for"))
                .is_ok()
        );
    }

    #[test]
    fn file_errors_name_the_origin_and_line() {
        let err = Policy::from_toml_str("[[rule]]\nmethod = \"/a.B/C\"\nfresh_totp = 3\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("policy, line 3: unknown field `fresh_totp`"),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");
        let err = Policy::from_toml_str("colour = 1\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("policy, line 1: unknown field `colour`"),
            "{err}"
        );
        let err = Policy::from_toml_str("[[rule]]\nroles = [\"a\"]\n")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "policy, line 1: a rule needs `method` or `service`");
        let err =
            Policy::from_toml_str("[[rule]]\nservice = \"a.B\"\n\n[[rule]]\nservice = \"/a.B/\"\n")
                .unwrap_err()
                .to_string();
        assert_eq!(
            err,
            "policy, line 4: a second rule for service a.B (the first is on line 1)"
        );
        for bad in [
            "[[rule]]\nmethod = \"Say\"\n",
            "[[rule]]\nmethod = \"/a.B/C/D\"\n",
            "[[rule]]\nservice = \"a..B\"\n",
            "[[rule]]\nmethod = \"/a.B/C\"\nservice = \"a.B\"\n",
            "[[rule]]\nmethod = \"/a.B/C\"\nfresh_totp_secs = 0\n",
            "[[rule]]\nmethod = \"/a.B/C\"\nfresh_totp_secs = -5\n",
            "[[rule]]\nmethod = \"/a.B/C\"\nroles = [\"\"]\n",
            "[[rule]]\nmethod = \"/a.B/C\"\nroles = \"admin\"\n",
            "[[rule]\n",
        ] {
            let err = Policy::from_toml_str(bad).unwrap_err().to_string();
            assert!(err.starts_with("policy, line "), "{bad}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
        let err = Policy::from_toml_file("/nonexistent/policy.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("/nonexistent/policy.toml: cannot read"),
            "{err}"
        );
    }

    #[test]
    fn targets_accept_both_spellings() {
        assert_eq!(
            RuleTarget::method("portcullis.demo.v1.Echo/Say").unwrap(),
            RuleTarget::Method(SAY.into())
        );
        assert_eq!(
            RuleTarget::service("/portcullis.demo.v1.Echo/").unwrap(),
            RuleTarget::service("portcullis.demo.v1.Echo").unwrap()
        );
        assert_eq!(RuleTarget::service("*").unwrap(), RuleTarget::All);
    }
}
