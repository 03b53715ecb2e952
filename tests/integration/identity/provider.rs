//! The test OIDC provider (`node tests/oidc/provider.mjs`) and a scripted
//! browser that approves device logins through the provider's own pages.

use std::{
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant, SystemTime},
};

use serde_json::{json, Value};

use crate::harness::{free_port, wait_with_timeout};

pub(crate) fn oidc_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/oidc")
}

/// Installs the provider's locked dependencies once per test process.
pub(crate) fn npm_ci() {
    static DONE: Mutex<bool> = Mutex::new(false);
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if *done || oidc_dir().join("node_modules/oidc-provider").exists() {
        *done = true;
        return;
    }
    let out = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(oidc_dir())
        .output()
        .expect("npm is installed (apt-get install nodejs npm)");
    assert!(
        out.status.success(),
        "npm ci in tests/oidc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    *done = true;
}

/// `node tests/oidc/provider.mjs` on a free loopback port.
pub(crate) struct OidcProvider {
    pub(crate) issuer: String,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl OidcProvider {
    pub(crate) fn start(ttl_seconds: u64) -> Self {
        Self::start_with(ttl_seconds, None)
    }

    /// With `tls` (certificate, key), the provider serves https.
    pub(crate) fn start_with(ttl_seconds: u64, tls: Option<(&Path, &Path)>) -> Self {
        npm_ci();
        // free_port() hands out a port that another test may take before
        // node binds it: try again on a fresh port if node exits early.
        let mut failures = Vec::new();
        for _ in 0..3 {
            match Self::spawn(ttl_seconds, tls) {
                Ok(provider) => return provider,
                Err(why) => failures.push(why),
            }
        }
        panic!("OIDC provider did not start:\n{}", failures.join("\n---\n"));
    }

    fn spawn(ttl_seconds: u64, tls: Option<(&Path, &Path)>) -> Result<Self, String> {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("provider.log");
        let err_path = dir.path().join("provider.err");
        let mut node = Command::new("node");
        node.arg(oidc_dir().join("provider.mjs")).args([
            "--port",
            &port.to_string(),
            "--ttl",
            &ttl_seconds.to_string(),
        ]);
        if let Some((cert, key)) = tls {
            node.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        let child = node
            .current_dir(oidc_dir())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(&err_path).unwrap())
            .spawn()
            .expect("node is installed");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut provider = Self {
            issuer: format!("{scheme}://127.0.0.1:{port}"),
            child,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !std::fs::read_to_string(&provider.log)
            .unwrap_or_default()
            .contains("listening on")
        {
            let exited = provider.child.try_wait().unwrap();
            if exited.is_some() || Instant::now() > deadline {
                let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
                return Err(format!(
                    "port {port}, {}: {stderr}",
                    exited.map_or("no answer in 60 s".to_string(), |s| s.to_string())
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(provider)
    }

    /// Signs `claims` with the provider's current key (`rs256`) or forges
    /// them (`none`, `hs256-public`).
    pub(crate) fn sign(&self, mode: &str, claims: Value) -> String {
        let body = json!({ "mode": mode, "claims": claims }).to_string();
        let out = curl(&[
            "-fsS",
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "--data",
            &body,
            &format!("{}/__test/sign", self.issuer),
        ]);
        String::from_utf8(out.stdout).unwrap()
    }

    /// What the provider reported on stderr (grant errors).
    pub(crate) fn errors(&self) -> String {
        std::fs::read_to_string(self.log.with_file_name("provider.err")).unwrap_or_default()
    }

    pub(crate) fn rotate_keys(&self) -> String {
        let out = curl(&[
            "-fsS",
            "-X",
            "POST",
            &format!("{}/__test/rotate", self.issuer),
        ]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["kid"].as_str().unwrap().to_string()
    }

    /// A client-credentials access token for `resource`.
    pub(crate) fn service_token(&self, resource: &str) -> String {
        let out = curl(&[
            "-fsS",
            "-d",
            "grant_type=client_credentials",
            "-d",
            "client_id=svc-reporting",
            "-d",
            "client_secret=svc-reporting-secret",
            "-d",
            &format!("resource={resource}"),
            &format!("{}/token", self.issuer),
        ]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["access_token"].as_str().unwrap().to_string()
    }

    /// Valid claims for alice, `exp` seconds from now.
    pub(crate) fn claims(&self, exp_in: i64) -> Value {
        let now = unix_now() as i64;
        json!({
            "iss": self.issuer, "sub": "alice", "aud": "portcullis",
            "iat": now, "exp": now + exp_in, "email": "alice@example.test",
            "groups": ["eng"],
        })
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub(crate) fn curl(args: &[&str]) -> Output {
    let out = Command::new("curl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A browser, scripted: follows the provider's device verification pages
/// (user code, confirmation, login, consent) with a cookie jar, submitting
/// each page's form with `fields` filled in, until the provider says the
/// sign-in succeeded.
pub(crate) fn approve_device(verification_uri: &str, fields: &[(&str, &str)], ca: Option<&Path>) {
    let jar_file = tempfile::NamedTempFile::new().unwrap();
    let jar_path = jar_file.path().display().to_string();
    let mut jar = vec!["-c".to_string(), jar_path.clone(), "-b".into(), jar_path];
    if let Some(ca) = ca {
        jar.extend(["--cacert".into(), ca.display().to_string()]);
    }
    let base = {
        let rest = verification_uri.split("://").nth(1).unwrap();
        let scheme = verification_uri.split("://").next().unwrap();
        format!("{scheme}://{}", rest.split('/').next().unwrap())
    };
    let mut page = browse(&jar, &["-L", verification_uri]);
    for _ in 0..10 {
        if page.contains("Sign-in Success") || page.contains("successfully") {
            return;
        }
        let (action, inputs) =
            parse_form(&page).unwrap_or_else(|| panic!("no form on provider page: {page}"));
        let mut args = vec!["-L".to_string()];
        if inputs.is_empty() {
            // Still a POST (curl -L then follows a 303 with a GET, as a
            // browser does).
            args.extend(["--data".into(), String::new()]);
        }
        for (name, value) in inputs {
            let value = fields
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(value, |(_, v)| v.to_string());
            args.push("--data-urlencode".into());
            args.push(format!("{name}={value}"));
        }
        args.push(if action.starts_with("http") {
            action
        } else {
            format!("{base}{action}")
        });
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        page = browse(&jar, &refs);
    }
    panic!("device approval did not finish: {page}");
}

/// curl with the cookie jar (and CA) options in `session`.
pub(crate) fn browse(session: &[String], args: &[&str]) -> String {
    let mut all = vec!["-sS"];
    all.extend(session.iter().map(String::as_str));
    all.extend_from_slice(args);
    String::from_utf8(curl(&all).stdout).unwrap()
}

/// The first form of `html`: its action and its inputs' names and values.
pub(crate) fn parse_form(html: &str) -> Option<(String, Vec<(String, String)>)> {
    let form_start = html.find("<form")?;
    let form = &html[form_start..html[form_start..].find("</form>")? + form_start];
    let action = attribute(&form[..form.find('>')?], "action")?;
    let mut inputs = Vec::new();
    let mut rest = form;
    while let Some(at) = rest.find("<input") {
        let tag = &rest[at..at + rest[at..].find('>')?];
        if let Some(name) = attribute(tag, "name") {
            inputs.push((name, attribute(tag, "value").unwrap_or_default()));
        }
        rest = &rest[at + tag.len()..];
    }
    Some((action, inputs))
}

pub(crate) fn attribute(tag: &str, name: &str) -> Option<String> {
    let needle = format!(" {name}=\"");
    let start = tag
        .find(&needle)
        .or_else(|| tag.find(&format!("\n{name}=\"")))?
        + needle.len();
    let end = tag[start..].find('"')? + start;
    Some(tag[start..end].replace("&amp;", "&"))
}

/// Runs `portcullis ... login` (the device flow) and approves it in the
/// provider's pages as `login`/`password`. Returns the CLI's output and
/// everything it wrote to stderr (its first line names the verification
/// URI and the code).
pub(crate) fn device_login_with(
    mut login_command: Command,
    login: &str,
    password: &str,
    ca: Option<&Path>,
) -> (Output, String) {
    let mut child = login_command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    // "To sign in, open URL and enter the code CODE"
    let words: Vec<&str> = line.split_whitespace().collect();
    let uri = words
        .iter()
        .find(|w| w.starts_with("http"))
        .unwrap_or_else(|| panic!("no verification URI in {line:?}"));
    let code = words.last().unwrap();
    approve_device(
        uri,
        &[
            ("user_code", code),
            ("login", login),
            ("password", password),
        ],
        ca,
    );
    let out = wait_with_timeout(child, Duration::from_secs(30));
    let mut rest = String::new();
    let _ = stderr.read_to_string(&mut rest);
    (out, line + &rest)
}
