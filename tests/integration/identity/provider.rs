//! The test OIDC provider (in `portcullis-testkit`) and a scripted browser
//! that approves device logins through the provider's own pages.

use std::{
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

pub(crate) use portcullis_testkit::oidc::{curl, unix_now, OidcProvider};

use crate::harness::wait_with_timeout;

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
