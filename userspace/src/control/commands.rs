//! `portcullis login`, `whoami` and `logout`: what the person at the
//! terminal runs, as themselves (no privileges needed).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::{request, Request, Response};
use crate::{
    config::Config,
    identity::{
        flows::{self, DevicePrompt},
        BindingInfo, LoginTokens, DEFAULT_CONTROL_SOCKET,
    },
};

/// How `portcullis login` signs in.
pub enum LoginMethod {
    /// A person, through the provider's device page.
    Device,
    /// A service account with its client secret.
    ClientCredentials {
        client_id: String,
        secret_file: PathBuf,
        scopes: Vec<String>,
    },
}

/// The control socket: `--socket`/`PORTCULLIS_CONTROL_SOCKET`, else the
/// config's (when this user may read it), else the default.
pub fn socket_path(flag: Option<&Path>, config_path: &Path) -> PathBuf {
    if let Some(path) = flag {
        return path.to_owned();
    }
    Config::load(config_path)
        .ok()
        .and_then(|c| c.identity)
        .map_or_else(
            || PathBuf::from(DEFAULT_CONTROL_SOCKET),
            |i| i.control_socket,
        )
}

pub fn login(socket: &Path, method: LoginMethod) -> anyhow::Result<()> {
    let params = match request(socket, &Request::LoginParams)? {
        Response::LoginParams(params) => params,
        other => bail!("{}", unexpected(other)),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let tokens: LoginTokens = runtime.block_on(async {
        match &method {
            LoginMethod::Device => {
                flows::device_login(&params, |prompt| async move { show(&prompt) }).await
            }
            LoginMethod::ClientCredentials {
                client_id,
                secret_file,
                scopes,
            } => flows::client_credentials_login(&params, client_id, secret_file, scopes).await,
        }
    })?;
    match request(socket, &Request::Login(tokens))? {
        Response::Bound(info) => {
            println!("{}", describe("logged in as", &info));
            Ok(())
        }
        other => bail!("{}", unexpected(other)),
    }
}

pub fn whoami(socket: &Path, json: bool) -> anyhow::Result<()> {
    match request(socket, &Request::Whoami).context("asking the gateway who you are")? {
        Response::Bound(info) if json => println!("{}", serde_json::to_string_pretty(&info)?),
        Response::Bound(info) => println!("{}", describe("you are", &info)),
        Response::NotBound { uid } if json => {
            println!("{}", serde_json::json!({ "uid": uid, "principal": null }))
        }
        Response::NotBound { uid } => {
            println!("uid {uid} is not logged in: run `portcullis login`")
        }
        other => bail!("{}", unexpected(other)),
    }
    Ok(())
}

pub fn logout(socket: &Path) -> anyhow::Result<()> {
    match request(socket, &Request::Logout)? {
        Response::LoggedOut(info) => {
            println!("logged out {} (uid {})", info.principal.name, info.uid)
        }
        Response::NotBound { uid } => println!("uid {uid} was not logged in"),
        other => bail!("{}", unexpected(other)),
    }
    Ok(())
}

fn show(prompt: &DevicePrompt) {
    eprintln!(
        "To sign in, open {} and enter the code {}",
        prompt.verification_uri, prompt.user_code
    );
    if let Some(complete) = &prompt.verification_uri_complete {
        eprintln!("(or open {complete})");
    }
    eprintln!(
        "Waiting for approval (the code expires in {} s)...",
        prompt.expires_in_seconds
    );
}

fn describe(what: &str, info: &BindingInfo) -> String {
    let p = &info.principal;
    let roles = if p.roles.is_empty() {
        "none".to_string()
    } else {
        p.roles.join(", ")
    };
    let left = info.expires_at.saturating_sub(crate::identity::unix_now());
    format!(
        "{what} {} ({:?}, subject {}) on uid {}; roles: {roles}; expires in {left} s{}",
        p.name,
        p.kind,
        p.subject,
        info.uid,
        if info.refreshable {
            ", renewed automatically"
        } else {
            ""
        }
    )
}

fn unexpected(response: Response) -> String {
    match response {
        Response::Error { message } => format!("the gateway refused: {message}"),
        other => format!("unexpected answer from the gateway: {other:?}"),
    }
}
