//! The test OIDC provider (`node tests/oidc/provider.mjs`, on the
//! `oidc-provider` package): a real issuer on a free loopback port, with
//! test-only endpoints to sign or forge tokens and rotate keys.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output},
    sync::Mutex,
    thread,
    time::{Duration, Instant, SystemTime},
};

use serde_json::{json, Value};

use crate::free_port;

/// The provider's folder, with its locked npm dependencies.
pub fn oidc_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../oidc")
}

/// Installs the provider's locked dependencies once per test process.
pub fn npm_ci() {
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
pub struct OidcProvider {
    pub issuer: String,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl OidcProvider {
    pub fn start(ttl_seconds: u64) -> Self {
        Self::start_with(ttl_seconds, None)
    }

    /// With `tls` (certificate, key), the provider serves https.
    pub fn start_with(ttl_seconds: u64, tls: Option<(&Path, &Path)>) -> Self {
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
    pub fn sign(&self, mode: &str, claims: Value) -> String {
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
    pub fn errors(&self) -> String {
        std::fs::read_to_string(self.log.with_file_name("provider.err")).unwrap_or_default()
    }

    pub fn rotate_keys(&self) -> String {
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
    pub fn service_token(&self, resource: &str) -> String {
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
    pub fn claims(&self, exp_in: i64) -> Value {
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

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

pub fn curl(args: &[&str]) -> Output {
    let out = Command::new("curl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
