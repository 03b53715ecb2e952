//! Identity against a real OpenID Connect provider (`oidc-provider` from
//! npm, tests/oidc) and a real daemon: device-flow login completed through
//! the provider's own pages, uid bindings used by redirected connections,
//! bad tokens, expiry, refresh, key rotation, service accounts, and a
//! second local user who cannot use the first one's binding.
//!
//! The provider's node_modules are installed with `npm ci` on first use
//! when missing (the setup step runs it too).

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    process::{Command, Output, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use portcullis::{
    audit::{Ack, AuditEvent, Recorder},
    identity::{IdentityConfig, IdentityError, IdentityProvider, OidcIdentity, PrincipalKind},
};
use serde_json::{json, Value};

use crate::harness::*;

pub(crate) mod provider;

use provider::*;

const NOBODY: &str = "65534";

/// A world-reachable directory for the control socket (the gateway's own
/// temp dir is 0700, and the second user must reach the socket).
fn socket_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn identity_toml(provider: &OidcProvider, socket: &Path, skew: u64, refresh: bool) -> String {
    format!(
        r#"
[identity]
issuer = "{}"
client_id = "portcullis"
audience = ["urn:portcullis"]
clock_skew_seconds = {skew}
control_socket = "{}"
scopes = ["openid", "profile", "email", "groups"{}]
resource = "urn:portcullis"

[identity.roles]
engineers = ["eng"]
dba = ["db-admins"]
auditors = ["audit"]
"#,
        provider.issuer,
        socket.display(),
        if refresh { ", \"offline_access\"" } else { "" }
    )
}

/// `portcullis <args>` as `uid` (0: as root), with the control socket.
fn cli_as(uid: &str, socket: &Path, args: &[&str]) -> Command {
    let mut cmd = portcullis_as(uid);
    cmd.args(args).arg("--socket").arg(socket);
    cmd
}

fn run_cli(uid: &str, socket: &Path, args: &[&str]) -> (bool, String, String) {
    let out = cli_as(uid, socket, args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn whoami(uid: &str, socket: &Path) -> Value {
    let (ok, stdout, stderr) = run_cli(uid, socket, &["whoami", "--json"]);
    assert!(ok, "whoami as {uid}: {stderr}");
    serde_json::from_str(&stdout).unwrap()
}

/// `portcullis login` as `uid`, approved in the provider's pages as
/// `login`/`password`. Returns the CLI's stdout.
fn device_login(uid: &str, socket: &Path, login: &str, password: &str) -> String {
    device_login_ca(uid, socket, login, password, None)
}

fn device_login_ca(
    uid: &str,
    socket: &Path,
    login: &str,
    password: &str,
    ca: Option<&Path>,
) -> String {
    let (out, stderr) = device_login_with(cli_as(uid, socket, &["login"]), login, password, ca);
    assert!(out.status.success(), "login as uid {uid} failed: {stderr}");
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// curl through the redirect, inside the cgroup, as `uid`.
fn curl_as(cgroup: &TestCgroup, uid: &str, url: &str) -> Output {
    let reuid = format!("--reuid={uid}");
    let regid = format!("--regid={uid}");
    cgroup.run(
        "setpriv",
        &[
            &reuid,
            &regid,
            "--clear-groups",
            "curl",
            "-sS",
            "-m",
            "10",
            url,
        ],
    )
}

fn wait_until(what: &str, timeout: Duration, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !pred() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn device_login_binds_the_callers_uid_and_names_redirected_sessions() {
    let provider = OidcProvider::start(300);
    let cgroup = TestCgroup::new();
    let upstream = HttpUpstream::start("127.0.0.1:0", "hello identity");
    let sockets = socket_dir();
    let socket = sockets.path().join("control.sock");
    let gateway = Gateway::start_with_config(
        &cgroup,
        &[Protect::redirect("127.0.0.1", upstream.addr.port())],
        &identity_toml(&provider, &socket, 5, true),
    );
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o666, "control socket is world-connectable");

    // Nobody is bound yet: opaque TCP cannot ask for a token, so refuse.
    let url = format!("http://{}/", upstream.addr);
    let out = curl_as(&cgroup, "0", &url);
    assert!(!out.status.success(), "unbound uid was relayed");
    let refused = gateway.wait_for_event("session_refused", |e| e["event"] == "session_refused");
    assert_eq!(
        refused["reason"],
        "no identity bound to uid 0: run `portcullis login`"
    );
    assert_eq!(
        upstream.accepted.load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    // Root signs in as alice through the provider's device pages.
    let stdout = device_login("0", &socket, "alice", "alice-pw");
    assert!(
        stdout.contains("logged in as alice@example.test"),
        "{stdout}"
    );
    assert!(stdout.contains("roles: dba, engineers"), "{stdout}");
    let me = whoami("0", &socket);
    assert_eq!(me["uid"], 0);
    assert_eq!(me["principal"]["name"], "alice@example.test");
    assert_eq!(me["principal"]["kind"], "person");
    assert_eq!(me["refreshable"], true);
    let login = gateway.wait_for_event("identity_login", |e| e["event"] == "identity_login");
    assert_eq!(login["uid"], 0);
    assert_eq!(
        login["principal"]["subject"],
        format!("{}#alice", provider.issuer)
    );

    // Root's redirected connection is attributed to alice.
    let out = curl_as(&cgroup, "0", &url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello identity");
    let start = gateway.wait_for_event("session_start as alice", |e| {
        e["event"] == "session_start" && e["uid"] == 0
    });
    assert_eq!(start["principal"]["name"], "alice@example.test");
    assert_eq!(start["principal"]["roles"], json!(["dba", "engineers"]));

    // A second local user cannot use alice's binding: not for whoami, not
    // for logout, not for connections.
    assert_eq!(whoami(NOBODY, &socket)["principal"], Value::Null);
    let (ok, stdout, _) = run_cli(NOBODY, &socket, &["logout"]);
    assert!(
        ok && stdout.contains("uid 65534 was not logged in"),
        "{stdout}"
    );
    assert_eq!(
        whoami("0", &socket)["principal"]["name"],
        "alice@example.test"
    );
    let out = curl_as(&cgroup, NOBODY, &url);
    assert!(
        !out.status.success(),
        "uid 65534 was relayed on alice's binding"
    );
    gateway.wait_for_event("session_refused for 65534", |e| {
        e["event"] == "session_refused"
            && e["reason"] == "no identity bound to uid 65534: run `portcullis login`"
    });

    // The second user signs in as bob: the daemon binds the uid the kernel
    // reported for the socket, not anything the client said.
    let stdout = device_login(NOBODY, &socket, "bob", "bob-pw");
    assert!(stdout.contains("logged in as bob@example.test"), "{stdout}");
    assert!(stdout.contains("on uid 65534"), "{stdout}");
    assert_eq!(
        whoami(NOBODY, &socket)["principal"]["roles"],
        json!(["auditors"])
    );
    let out = curl_as(&cgroup, NOBODY, &url);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let start = gateway.wait_for_event("session_start as bob", |e| {
        e["event"] == "session_start" && e["uid"] == 65534
    });
    assert_eq!(start["principal"]["name"], "bob@example.test");
    assert_eq!(
        whoami("0", &socket)["principal"]["name"],
        "alice@example.test"
    );

    // Logout ends only the caller's binding.
    assert!(!provider.errors().contains("refresh_token.destroyed"));
    let (ok, stdout, stderr) = run_cli("0", &socket, &["logout"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("logged out alice@example.test (uid 0)"),
        "{stdout}"
    );
    assert_eq!(whoami("0", &socket)["principal"], Value::Null);
    assert_eq!(
        whoami(NOBODY, &socket)["principal"]["name"],
        "bob@example.test"
    );
    let logout = gateway.wait_for_event("identity_logout", |e| e["event"] == "identity_logout");
    assert_eq!(logout["uid"], 0);
    assert_eq!(logout["reason"], "logout");
    // Alice's refresh token was revoked at the provider (RFC 7009).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !provider.errors().contains("refresh_token.destroyed") {
        assert!(
            Instant::now() < deadline,
            "refresh token not revoked: {}\nprovider: {}",
            gateway.log(),
            provider.errors()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Collects events in memory, for the in-process provider below (the
/// verifier under test does not record).
struct Collect(Mutex<Vec<AuditEvent>>);

impl Recorder for Collect {
    fn record(&self, event: AuditEvent) -> Ack {
        self.0.lock().unwrap().push(event);
        Ack::done(Ok(()))
    }
}

fn in_process(provider: &OidcProvider, skew: u64) -> Arc<OidcIdentity> {
    start_in_process(provider, &format!("clock_skew_seconds = {skew}\n")).unwrap()
}

/// The daemon's identity provider, in this process, with `extra` config.
fn start_in_process(
    provider: &OidcProvider,
    extra: &str,
) -> Result<Arc<OidcIdentity>, IdentityError> {
    let config: IdentityConfig = toml::from_str(&format!(
        "issuer = \"{}\"\nclient_id = \"portcullis\"\naudience = [\"urn:portcullis\"]\n{extra}[roles]\nengineers = [\"eng\"]\n",
        provider.issuer
    ))
    .unwrap();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(OidcIdentity::start(
            &config,
            Arc::new(Collect(Mutex::new(Vec::new()))),
        ))
}

fn verify(
    runtime: &tokio::runtime::Runtime,
    identity: &OidcIdentity,
    token: &str,
) -> Result<portcullis::identity::Principal, String> {
    runtime
        .block_on(identity.verify_token(token))
        .map(|verified| verified.principal)
        .map_err(|e| match e {
            IdentityError::Rejected(short) => short,
            other => panic!("not a rejection: {other}"),
        })
}

/// Sends a raw login request over the control socket, as a hostile client
/// would, and returns the daemon's answer.
fn raw_login(socket: &Path, token: &str) -> Value {
    let request = json!({"op": "login", "id_token": token}).to_string() + "\n";
    raw_request(socket, request.as_bytes())
}

fn raw_request(socket: &Path, bytes: &[u8]) -> Value {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    // The daemon may answer (and close) before reading everything.
    let _ = stream.write_all(bytes);
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("answer {answer:?}: {e}"))
}

#[test]
fn bad_tokens_are_rejected_with_a_reason() {
    let provider = OidcProvider::start(300);
    let cgroup = TestCgroup::new();
    let sockets = socket_dir();
    let socket = sockets.path().join("control.sock");
    let gateway =
        Gateway::start_with_config(&cgroup, &[], &identity_toml(&provider, &socket, 5, false));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let identity = in_process(&provider, 5);

    // A well-formed token passes, so each failure below is for its reason.
    let good = provider.sign("rs256", provider.claims(300));
    let principal = verify(&runtime, &identity, &good).unwrap();
    assert_eq!(principal.name, "alice@example.test");
    assert_eq!(principal.roles, ["engineers"]);

    let mut wrong_iss = provider.claims(300);
    wrong_iss["iss"] = json!("http://127.0.0.1:1");
    let mut wrong_aud = provider.claims(300);
    wrong_aud["aud"] = json!("someone-else");
    let mut not_yet = provider.claims(300);
    not_yet["nbf"] = json!(unix_now() + 600);
    let cases = [
        (
            "alg none",
            provider.sign("none", provider.claims(300)),
            "token signature algorithm not accepted",
            "unsigned token (alg none)",
        ),
        (
            "HS256 with the public key",
            provider.sign("hs256-public", provider.claims(300)),
            "token signature algorithm not accepted",
            "HS256",
        ),
        (
            "wrong issuer",
            provider.sign("rs256", wrong_iss),
            "token issuer not accepted",
            "wrong issuer",
        ),
        (
            "wrong audience",
            provider.sign("rs256", wrong_aud),
            "token audience not accepted",
            "wrong audience",
        ),
        (
            "real token for another resource",
            provider.service_token("urn:elsewhere"),
            "token audience not accepted",
            "urn:elsewhere",
        ),
        (
            "expired",
            provider.sign("rs256", provider.claims(-60)),
            "token expired or not yet valid",
            "expired",
        ),
        (
            "not yet valid",
            provider.sign("rs256", not_yet),
            "token not yet valid",
            "not valid before",
        ),
        (
            "garbage",
            "not.a.jwt".to_string(),
            "token is not a signed JWT",
            "not a JWT",
        ),
    ];
    for (case, token, short, logged) in cases {
        assert_eq!(
            verify(&runtime, &identity, &token).unwrap_err(),
            short,
            "{case}"
        );
        let answer = raw_login(&socket, &token);
        assert_eq!(answer["result"], "error", "{case}: {answer}");
        assert_eq!(answer["message"], short, "{case}");
        let reason = gateway.wait_for_event(case, |e| {
            e["event"] == "identity_rejected"
                && e["reason"].as_str().is_some_and(|r| r.contains(logged))
        });
        // The log names the reason.
        gateway.wait_for_log(reason["reason"].as_str().unwrap());
    }
    // Nothing was bound by any of them.
    assert_eq!(whoami("0", &socket)["principal"], Value::Null);

    // Garbage, oversized and silent clients get an answer or a timeout,
    // never a crash.
    for (what, bytes) in [
        ("not JSON", b"hello\n".to_vec()),
        ("unknown op", b"{\"op\":\"become_root\"}\n".to_vec()),
        ("oversized", vec![b'x'; 70 * 1024]),
    ] {
        let answer = raw_request(&socket, &bytes);
        assert_eq!(answer["result"], "error", "{what}: {answer}");
    }
    assert!(whoami("0", &socket)["uid"] == 0, "the daemon still serves");

    // A service account's client-credentials token is a machine identity.
    let service = verify(
        &runtime,
        &identity,
        &provider.service_token("urn:portcullis"),
    )
    .unwrap();
    assert_eq!(service.kind, PrincipalKind::Service);
    assert_eq!(service.name, "svc-reporting");
}

/// Verified tokens are remembered (a client connecting once per query
/// pays for one signature check), but never past their expiry.
#[test]
fn a_remembered_token_is_refused_once_it_expires() {
    let provider = OidcProvider::start(300);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let identity = in_process(&provider, 0);
    let claims = provider.claims(2);
    let expires = claims["exp"].as_u64().unwrap();
    let token = provider.sign("rs256", claims);
    for _ in 0..2 {
        assert_eq!(
            verify(&runtime, &identity, &token).unwrap().name,
            "alice@example.test"
        );
    }
    wait_until("the token's expiry", Duration::from_secs(10), || {
        unix_now() > expires
    });
    assert_eq!(
        verify(&runtime, &identity, &token).unwrap_err(),
        "token expired or not yet valid"
    );
}

#[test]
fn service_account_login_binds_a_machine_identity() {
    let provider = OidcProvider::start(300);
    let cgroup = TestCgroup::new();
    let upstream = HttpUpstream::start("127.0.0.1:0", "hello machine");
    let sockets = socket_dir();
    let socket = sockets.path().join("control.sock");
    let gateway = Gateway::start_with_config(
        &cgroup,
        &[Protect::redirect("127.0.0.1", upstream.addr.port())],
        &identity_toml(&provider, &socket, 5, false),
    );
    // The secret file belongs to the service's own user.
    let secret = sockets.path().join("svc.secret");
    std::fs::write(&secret, "svc-reporting-secret\n").unwrap();
    let _ = Command::new("chown")
        .args([NOBODY, secret.to_str().unwrap()])
        .status();
    let login = || {
        run_cli(
            NOBODY,
            &socket,
            &[
                "login",
                "--client-id",
                "svc-reporting",
                "--client-secret-file",
                secret.to_str().unwrap(),
            ],
        )
    };
    // A secret others can read is refused before it is sent anywhere.
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, _, stderr) = login();
    assert!(!ok && stderr.contains("chmod 600"), "{stderr}");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (ok, stdout, stderr) = login();
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("logged in as svc-reporting (Service"),
        "{stdout}"
    );
    let out = curl_as(&cgroup, NOBODY, &format!("http://{}/", upstream.addr));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let start = gateway.wait_for_event("session_start", |e| e["event"] == "session_start");
    assert_eq!(start["principal"]["kind"], "service");
    assert_eq!(start["principal"]["name"], "svc-reporting");
}

#[test]
fn binding_ends_when_the_token_expires() {
    let provider = OidcProvider::start(4);
    let cgroup = TestCgroup::new();
    let upstream = HttpUpstream::start("127.0.0.1:0", "short");
    let sockets = socket_dir();
    let socket = sockets.path().join("control.sock");
    let gateway = Gateway::start_with_config(
        &cgroup,
        &[Protect::redirect("127.0.0.1", upstream.addr.port())],
        &identity_toml(&provider, &socket, 0, false),
    );
    device_login("0", &socket, "alice", "alice-pw");
    let me = whoami("0", &socket);
    assert_eq!(
        me["refreshable"], false,
        "no offline_access, no refresh token"
    );
    let expires_at = me["expires_at"].as_u64().unwrap();
    assert!(expires_at <= unix_now() + 4);
    wait_until("expiry", Duration::from_secs(10), || {
        unix_now() > expires_at
    });
    assert_eq!(whoami("0", &socket)["principal"], Value::Null);
    let out = curl_as(&cgroup, "0", &format!("http://{}/", upstream.addr));
    assert!(!out.status.success(), "expired binding was used");
    gateway.wait_for_event("session_refused", |e| e["event"] == "session_refused");
    let logout = gateway.wait_for_event("expiry", |e| e["event"] == "identity_logout");
    assert_eq!(logout["reason"], "expired");
}

#[test]
fn refresh_renews_the_binding_across_a_key_rotation() {
    let provider = OidcProvider::start(6);
    let cgroup = TestCgroup::new();
    let sockets = socket_dir();
    let socket = sockets.path().join("control.sock");
    let gateway =
        Gateway::start_with_config(&cgroup, &[], &identity_toml(&provider, &socket, 0, true));
    device_login("0", &socket, "alice", "alice-pw");
    let first = whoami("0", &socket);
    assert_eq!(first["refreshable"], true);
    let first_expiry = first["expires_at"].as_u64().unwrap();

    // Renewed before expiry, without a new login.
    gateway.wait_for_event("identity_refresh", |e| e["event"] == "identity_refresh");
    wait_until("expiry of the first token", Duration::from_secs(10), || {
        unix_now() > first_expiry + 1
    });
    let renewed = whoami("0", &socket);
    assert_eq!(renewed["principal"]["name"], "alice@example.test");
    assert!(renewed["expires_at"].as_u64().unwrap() > first_expiry);

    // The provider rotates its signing key: the next refreshed ID token
    // names a kid the daemon has not seen; it re-fetches the JWKS.
    let kid = provider.rotate_keys();
    let refreshes = || {
        gateway
            .events()
            .iter()
            .filter(|e| e["event"] == "identity_refresh")
            .count()
    };
    let before = refreshes();
    let deadline = Instant::now() + Duration::from_secs(15);
    while refreshes() <= before {
        assert!(
            Instant::now() < deadline,
            "no refresh after the key rotation: {}\nprovider: {}",
            gateway.log(),
            provider.errors()
        );
        thread::sleep(Duration::from_millis(100));
    }
    // The rotation was noticed.
    gateway.wait_for_log("re-fetched (unknown key id)");
    let after = whoami("0", &socket);
    assert_eq!(after["principal"]["name"], "alice@example.test");
    assert!(!kid.is_empty());
    assert!(
        !gateway
            .events()
            .iter()
            .any(|e| e["event"] == "identity_logout"),
        "the binding survived the rotation"
    );
}

/// `psql -c sql` to `port`, started: through the redirect (in the cgroup)
/// or directly (from the test process) with TLS required; `password` as
/// PGPASSWORD.
fn psql_started(
    cgroup: Option<&TestCgroup>,
    port: u16,
    db: &str,
    password: Option<&str>,
    sql: &str,
) -> std::process::Child {
    let port = port.to_string();
    let args = [
        "-X",
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-U",
        "postgres",
        "-d",
        db,
        "-Atc",
        sql,
    ];
    let mut cmd = match cgroup {
        Some(cgroup) => cgroup.command("psql", &args),
        None => {
            let mut c = Command::new("psql");
            c.args(args).env("PGSSLMODE", "require");
            c
        }
    };
    cmd.env_remove("PGPASSWORD").env("PGCONNECT_TIMEOUT", "10");
    if let Some(password) = password {
        cmd.env("PGPASSWORD", password);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `select current_user` through the gateway (see [`psql_started`]).
fn psql(cgroup: Option<&TestCgroup>, port: u16, db: &str, password: Option<&str>) -> Output {
    let child = psql_started(cgroup, port, db, password, "select current_user");
    wait_with_timeout(child, Duration::from_secs(30))
}

/// A cluster behind a gateway that knows the provider: redirected clients
/// reach resource "orders", and a `postgres` listener (direct, TLS) serves
/// remote ones. The dba role and the svc-reporting service may use it.
struct PgBehindIdentity {
    // Dropped in this order: the gateway before what it uses.
    gateway: Gateway,
    cluster: crate::pg::PgCluster,
    cgroup: TestCgroup,
    listener_port: u16,
    socket: std::path::PathBuf,
    _sockets: tempfile::TempDir,
}

impl PgBehindIdentity {
    fn start(provider: &OidcProvider) -> Self {
        use crate::pg::{PgCluster, PG_PASSWORD};

        let cgroup = TestCgroup::new();
        let cluster = PgCluster::start_with(false);
        let secret = cluster.secret_file("identity", PG_PASSWORD);
        let tls = cluster.dir().join("gateway-tls");
        self_signed(&tls, &[]);
        let listener_port = free_port();
        let sockets = socket_dir();
        let socket = sockets.path().join("control.sock");
        let extra = format!(
            r#"
[[listener]]
name = "pg"
address = "127.0.0.1:{listener_port}"
protocol = "postgres"
direct = true
tls_cert = "{tls}/cert.pem"
tls_key = "{tls}/key.pem"

[[resource]]
name = "orders"
protocol = "postgres"
address = "{address}"

[[resource.grant]]
roles = ["dba"]
upstream_user = "postgres"
password_file = "{secret}"

[[resource.grant]]
users = ["svc-reporting"]
upstream_user = "postgres"
password_file = "{secret}"
{identity}"#,
            tls = tls.display(),
            address = cluster.addr(),
            secret = secret.display(),
            identity = identity_toml(provider, &socket, 5, false),
        );
        let gateway = Gateway::start_with_config(
            &cgroup,
            &[Protect::postgres("127.0.0.1", cluster.port)],
            &extra,
        );
        Self {
            gateway,
            cluster,
            cgroup,
            listener_port,
            socket,
            _sockets: sockets,
        }
    }

    /// How many upstream backends run `sql` now.
    fn running(&self, sql: &str) -> usize {
        self.cluster
            .sql(&format!(
                "select count(*) from pg_stat_activity where query = '{sql}' and pid <> pg_backend_pid()"
            ))
            .trim()
            .parse()
            .unwrap()
    }
}

#[test]
fn postgres_takes_the_uid_binding_or_a_token_as_password() {
    let provider = OidcProvider::start(300);
    let s = PgBehindIdentity::start(&provider);
    let (cgroup, gateway, port) = (&s.cgroup, &s.gateway, s.cluster.port);

    // Redirected, no binding, no password: the adapter asks for a token.
    let out = psql(Some(cgroup), port, "postgres", None);
    assert!(!out.status.success());
    // Redirected with a forged token as the password: refused, with why.
    let forged = provider.sign("none", provider.claims(300));
    let out = psql(Some(cgroup), port, "postgres", Some(&forged));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("token refused: token signature algorithm not accepted"),
        "{err}"
    );

    // After `portcullis login` the uid binding is the identity: no password.
    device_login("0", &s.socket, "alice", "alice-pw");
    let out = psql(Some(cgroup), port, "postgres", None);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        gateway.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "postgres");
    let login = gateway.wait_for_event("database_login as alice", |e| {
        e["event"] == "database_login" && e["direct"] == false
    });
    assert_eq!(login["principal"]["name"], "alice@example.test");

    // A remote (direct) client presents a service account's token.
    let token = provider.service_token("urn:portcullis");
    let out = psql(None, s.listener_port, "orders", Some(&token));
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        gateway.log()
    );
    let login = gateway.wait_for_event("database_login as the service", |e| {
        e["event"] == "database_login" && e["direct"] == true
    });
    assert_eq!(login["principal"]["name"], "svc-reporting");
    assert_eq!(login["principal"]["kind"], "service");
}

#[test]
fn sessions_end_with_their_identity() {
    const SLEEP: &str = "select pg_sleep(60)";
    let provider = OidcProvider::start(300);
    let s = PgBehindIdentity::start(&provider);
    let wait_running = |n: usize| {
        wait_until("pg_sleep backends", Duration::from_secs(10), || {
            s.running(SLEEP) == n
        })
    };

    // A redirected session on the uid's binding, in a long statement: the
    // logout ends it, with a FATAL error that says why, and the statement
    // is cancelled upstream rather than left running.
    device_login("0", &s.socket, "alice", "alice-pw");
    let bound = psql_started(Some(&s.cgroup), s.cluster.port, "postgres", None, SLEEP);
    wait_running(1);
    let (ok, _, stderr) = run_cli("0", &s.socket, &["logout"]);
    assert!(ok, "{stderr}");
    let out = wait_with_timeout(bound, Duration::from_secs(15));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("FATAL:  terminating connection: the identity this session was opened with has ended (logout)"),
        "{err}"
    );
    wait_running(0);
    let end = s.gateway.wait_for_event("session_end after logout", |e| {
        e["event"] == "session_end" && !e["error"].is_null()
    });
    assert_eq!(end["error"], "the identity ended: logout");
    // What was relayed until then is counted: the statement's 25 bytes.
    assert_eq!(end["bytes_from_client"], 25, "{end}");

    // A direct client's session lasts as long as its token (here 2 s, and
    // the 5 s of clock skew the gateway allows).
    let mut claims = provider.claims(2);
    claims["groups"] = json!(["db-admins"]);
    let token = provider.sign("rs256", claims);
    let started = Instant::now();
    let direct = psql_started(None, s.listener_port, "orders", Some(&token), SLEEP);
    let out = wait_with_timeout(direct, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("has ended (the token expired)"),
        "{err}\n{}",
        s.gateway.log()
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    wait_running(0);
}

#[test]
fn a_tcp_session_ends_with_its_identity() {
    let provider = OidcProvider::start(300);
    let cgroup = TestCgroup::new();
    // An upstream that accepts and never answers: the session stays open
    // until something ends it.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let accepted = thread::spawn(move || silent.accept().map(|(stream, _)| stream));
    let sockets = socket_dir();
    let socket = sockets.path().join("control.sock");
    let gateway = Gateway::start_with_config(
        &cgroup,
        &[Protect::redirect("127.0.0.1", addr.port())],
        &identity_toml(&provider, &socket, 5, false),
    );
    device_login("0", &socket, "alice", "alice-pw");
    let curl = cgroup
        .command("curl", &["-sS", "-m", "30", &format!("http://{addr}/")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut upstream = accepted.join().unwrap().unwrap();
    // curl's request has come through before the logout.
    upstream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut request = Vec::new();
    while !request.ends_with(b"\r\n\r\n") {
        let mut byte = [0];
        std::io::Read::read_exact(&mut upstream, &mut byte).unwrap();
        request.push(byte[0]);
    }
    let (ok, _, stderr) = run_cli("0", &socket, &["logout"]);
    assert!(ok, "{stderr}");
    // Both sides are closed: the client sees the connection end, the
    // upstream its end of file.
    let out = wait_with_timeout(curl, Duration::from_secs(15));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Empty reply from server"), "{err}");
    upstream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut upstream, &mut rest).unwrap();
    let end = gateway.wait_for_event("session_end", |e| e["event"] == "session_end");
    assert_eq!(end["error"], "the identity ended: logout");
    // What it relayed until then is counted all the same.
    assert_eq!(
        end["bytes_from_client"],
        request.len() + rest.len(),
        "{end}"
    );
    assert_eq!(end["bytes_from_server"], 0, "{end}");
}

#[test]
fn provider_behind_a_private_ca() {
    let tls = tempfile::tempdir().unwrap();
    self_signed(tls.path(), &[]);
    let (cert, key) = (tls.path().join("cert.pem"), tls.path().join("key.pem"));
    let provider = OidcProvider::start_with(300, Some((&cert, &key)));
    assert!(provider.issuer.starts_with("https://"));

    // Not trusted without the CA: the daemon refuses to start, and says why.
    let err = start_in_process(&provider, "")
        .err()
        .expect("untrusted provider accepted");
    assert!(err.to_string().contains("certificate"), "{err}");

    // With ca_file, sign-in, whoami and logout (with revocation) work over https.
    let cgroup = TestCgroup::new();
    let sockets = socket_dir();
    let socket = sockets.path().join("control.sock");
    let config = identity_toml(&provider, &socket, 5, true).replace(
        "[identity]\n",
        &format!("[identity]\nca_file = \"{}\"\n", cert.display()),
    );
    let gateway = Gateway::start_with_config(&cgroup, &[], &config);
    let stdout = device_login_ca("0", &socket, "alice", "alice-pw", Some(&cert));
    assert!(
        stdout.contains("logged in as alice@example.test"),
        "{stdout}"
    );
    let (ok, stdout, stderr) = run_cli("0", &socket, &["logout"]);
    assert!(
        ok && stdout.contains("logged out alice@example.test"),
        "{stderr}"
    );
    wait_until("revocation over https", Duration::from_secs(5), || {
        gateway
            .log()
            .contains("refresh token revoked at the provider")
    });
}
