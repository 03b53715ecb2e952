//! `cargo xtask setup`: make a fresh Debian 12 machine able to build, test and
//! run Portcullis.
//!
//! Every step checks before it acts, so a second run changes nothing and
//! takes a second or two: that is what lets `test` and `demo` call it first.

use std::{
    collections::HashSet,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

use crate::util::{self, cargo_bin_dir, cmd, output, probe, report, run};

/// Debian packages the build, the tests and the demo need.
///
/// `build-essential` supplies the `cc` linker rustc uses for host binaries;
/// the others are the eBPF toolchain (bpftool, clang, llvm), the servers the
/// integration tests put behind the gateway (PostgreSQL, pgbouncer, OpenSSH),
/// clients and tools the tests drive (psql, curl, python3, ip, nsenter,
/// openssl), pip for [`newer_libpq`], and node/chromium for the
/// browser-based OIDC tests.
pub const PACKAGES: &[&str] = &[
    "build-essential",
    "bpftool",
    "clang",
    "libclang-dev",
    "llvm",
    "postgresql",
    "postgresql-client",
    "pgbouncer",
    "openssh-server",
    "openssh-client",
    "curl",
    "python3",
    "python3-pip",
    "openssl",
    "iproute2",
    "util-linux",
    "nodejs",
    "npm",
    "chromium",
];

const TASK: &str = "setup";

/// Runs every setup step in order; stops at the first that fails.
pub fn run_all() -> Result<()> {
    util::require_root(TASK)?;
    apt_packages()?;
    nightly_rust_src()?;
    bpf_linker()?;
    bpffs()?;
    npm_dependencies()?;
    newer_libpq()?;
    Ok(())
}

/// Installs whichever of [`PACKAGES`] are missing.
///
/// A package counts as present when an installed package *provides* it, not
/// only when it is installed under that name: NodeSource's `nodejs` provides
/// and conflicts with `npm`, and asking apt for `npm` there would fail.
fn apt_packages() -> Result<()> {
    let present = installed_packages()?;
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !present.contains(*p))
        .collect();
    if missing.is_empty() {
        report(TASK, "apt packages", "ok: already installed");
        return Ok(());
    }
    report(
        TASK,
        "apt packages",
        format!("installing {}", missing.join(" ")),
    );
    run(cmd("apt-get")
        .arg("update")
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(cmd("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    report(TASK, "apt packages", "installed");
    Ok(())
}

/// Names of installed packages and of everything they provide.
fn installed_packages() -> Result<HashSet<String>> {
    let list =
        output(cmd("dpkg-query").args(["-W", "-f=${db:Status-Abbrev}\t${Package}\t${Provides}\n"]))
            .context("listing installed packages (is this Debian or Ubuntu?)")?;
    Ok(parse_installed(&list))
}

/// Parses `dpkg-query` lines of `status<TAB>package<TAB>provides`.
fn parse_installed(list: &str) -> HashSet<String> {
    let mut present = HashSet::new();
    for line in list.lines() {
        let mut fields = line.split('\t');
        let (Some(status), Some(package)) = (fields.next(), fields.next()) else {
            continue;
        };
        // The second letter is the current state: 'i' installed. Packages
        // removed with their config files left ("rc") do not count.
        if status.chars().nth(1) != Some('i') {
            continue;
        }
        present.insert(strip_arch(package).to_owned());
        for provided in fields.next().unwrap_or("").split(',') {
            if let Some(name) = provided.split_whitespace().next() {
                present.insert(strip_arch(name).to_owned());
            }
        }
    }
    present
}

fn strip_arch(name: &str) -> &str {
    name.split(':').next().unwrap_or(name)
}

/// The nightly toolchain with rust-src, which `-Z build-std=core` needs to
/// build the eBPF programs.
fn nightly_rust_src() -> Result<()> {
    let toolchains = output(cmd("rustup").args(["toolchain", "list"]))
        .context("rustup is needed: install it from https://rustup.rs")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        report(TASK, "nightly toolchain", "installing");
        run(cmd("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
        report(TASK, "nightly toolchain", "installed");
    }
    let components =
        output(cmd("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))?;
    if components.lines().any(|l| l.starts_with("rust-src")) {
        report(TASK, "nightly rust-src", "ok: already installed");
        return Ok(());
    }
    run(cmd("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    report(TASK, "nightly rust-src", "installed");
    Ok(())
}

/// bpf-linker, linked against nightly's own LLVM.
///
/// Debian's LLVM (14, or 19 from backports) cannot read the bitcode nightly
/// emits, so bpf-linker is built without its own LLVM (`no-llvm-linking`)
/// and linked to nightly's `libLLVM-<major>-rust-*.so`, with an rpath so it
/// finds that library at run time. The LLVM major picks the `llvm-<major>`
/// feature, so the recipe follows nightly when its LLVM moves on.
fn bpf_linker() -> Result<()> {
    if let Some(version) = bpf_linker_version()? {
        report(
            TASK,
            "bpf-linker",
            format!("ok: already installed ({version})"),
        );
        return Ok(());
    }
    let sysroot = output(cmd("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let llvm = find_nightly_llvm(&lib_dir)?;
    report(
        TASK,
        "bpf-linker",
        format!(
            "building against {} (takes a minute or two)",
            llvm.file.display()
        ),
    );
    let lib = lib_dir.display();
    run(cmd("cargo")
        .args([
            "+nightly",
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{},no-llvm-linking", llvm.major))
        .env(
            "RUSTFLAGS",
            format!(
                "-L {lib} -l dylib={} -C link-arg=-Wl,-rpath,{lib}",
                llvm.link_name
            ),
        ))?;
    match bpf_linker_version()? {
        Some(version) => report(TASK, "bpf-linker", format!("installed ({version})")),
        None => bail!(
            "`cargo install bpf-linker` succeeded but `bpf-linker --version` still fails; \
             check {}",
            cargo_bin_dir().unwrap_or_default().display()
        ),
    }
    Ok(())
}

/// `bpf-linker --version` if it runs, looked up on PATH and in ~/.cargo/bin.
fn bpf_linker_version() -> Result<Option<String>> {
    Ok(probe(cmd("bpf-linker").arg("--version"))?
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned()))
}

/// Nightly's LLVM shared library and what the build needs to know about it.
#[derive(Debug, PartialEq)]
struct NightlyLlvm {
    file: PathBuf,
    /// LLVM major version, which picks bpf-linker's `llvm-<major>` feature.
    major: u32,
    /// The name for `-l dylib=`: the file name without `lib` and `.so`.
    link_name: String,
}

fn find_nightly_llvm(lib_dir: &Path) -> Result<NightlyLlvm> {
    let entries =
        fs::read_dir(lib_dir).with_context(|| format!("reading {}", lib_dir.display()))?;
    for entry in entries {
        let entry = entry?;
        if let Some(llvm) = parse_llvm_file_name(&entry.file_name().to_string_lossy()) {
            return Ok(NightlyLlvm {
                file: entry.path(),
                ..llvm
            });
        }
    }
    bail!(
        "no libLLVM-<major>-rust-*.so in {}: is the nightly toolchain complete? \
         (`rustup toolchain install nightly`)",
        lib_dir.display()
    )
}

/// `libLLVM-22-rust-1.97.0-nightly.so` -> major 22, link name
/// `LLVM-22-rust-1.97.0-nightly`.
fn parse_llvm_file_name(name: &str) -> Option<NightlyLlvm> {
    let stem = name.strip_prefix("lib")?.strip_suffix(".so")?;
    let rest = stem.strip_prefix("LLVM-")?;
    let (major, tail) = rest.split_once('-')?;
    if !tail.starts_with("rust-") {
        return None;
    }
    Some(NightlyLlvm {
        file: PathBuf::from(name),
        major: major.parse().ok()?,
        link_name: stem.to_owned(),
    })
}

/// bpffs on /sys/fs/bpf, where the daemon pins its links and maps so that
/// enforcement outlives restarts. systemd mounts it at boot; containers and
/// minimal VMs often do not.
fn bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if is_bpffs_mounted(&mounts) {
        report(TASK, "bpffs on /sys/fs/bpf", "ok: already mounted");
        return Ok(());
    }
    fs::create_dir_all("/sys/fs/bpf").context("creating /sys/fs/bpf")?;
    run(cmd("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    report(
        TASK,
        "bpffs on /sys/fs/bpf",
        "mounted (until reboot; systemd's sys-fs-bpf.mount does it at boot)",
    );
    Ok(())
}

fn is_bpffs_mounted(mounts: &str) -> bool {
    mounts.lines().any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.get(1) == Some(&"/sys/fs/bpf") && fields.get(2) == Some(&"bpf")
    })
}

/// The OIDC test helpers' node modules, from the lock file only.
///
/// `npm ci` always deletes node_modules first, so it is skipped when npm's
/// own record of the installed tree (node_modules/.package-lock.json) is
/// newer than package-lock.json.
fn npm_dependencies() -> Result<()> {
    let dir = util::repo_root().join("tests/oidc");
    let step = "npm packages (tests/oidc)";
    if !dir.join("package.json").exists() {
        report(TASK, step, "skipped: no tests/oidc/package.json");
        return Ok(());
    }
    let lock = dir.join("package-lock.json");
    if !lock.exists() {
        report(
            TASK,
            step,
            "skipped: no package-lock.json (run `npm install` there and commit the lock)",
        );
        return Ok(());
    }
    let installed = dir.join("node_modules/.package-lock.json");
    let modified = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(installed), Some(lock)) = (modified(&installed), modified(&lock)) {
        if installed >= lock {
            report(TASK, step, "ok: already installed");
            return Ok(());
        }
    }
    run(cmd("npm").arg("ci").current_dir(&dir))?;
    report(TASK, step, "installed");
    Ok(())
}

/// The wheel [`newer_libpq`] takes libpq from, and its SHA-256 as PyPI
/// lists it.
const LIBPQ_WHEEL: &str = "psycopg-binary==3.3.9";
const LIBPQ_WHEEL_SHA256: &str = "0953c1b94c73f97efce5b8fb1dad85cf5e4085b94902e439e27e6805ebc8be99";

/// A libpq newer than Debian 12's (15), for the tests of clients that
/// start TLS without SSLRequest (`sslnegotiation=direct`, libpq 17 and
/// later). psycopg's binary wheel bundles libpq 18 with the libraries it
/// links; the tests run the system's psql on it (`LD_LIBRARY_PATH`). The
/// wheel is pinned by version and hash, and unpacked into
/// tests/clients/psycopg-binary.
fn newer_libpq() -> Result<()> {
    let step = "libpq 18 (tests/clients)";
    let clients = util::repo_root().join("tests/clients");
    let unpacked = clients.join("psycopg-binary");
    let libs = unpacked.join("psycopg_binary.libs");
    if libs.join("libpq.so.5").exists() {
        report(TASK, step, "ok: already installed");
        return Ok(());
    }
    if std::env::consts::ARCH != "x86_64" {
        report(TASK, step, "skipped: the pinned wheel is for x86_64 only");
        return Ok(());
    }
    let download = util::target_dir().join("libpq-wheel");
    let _ = fs::remove_dir_all(&download);
    run(cmd("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--platform",
            "manylinux2014_x86_64",
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            "--dest",
        ])
        .arg(&download)
        .arg(LIBPQ_WHEEL))?;
    let wheel = fs::read_dir(&download)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .context("pip downloaded no wheel")?;
    let sum = output(cmd("sha256sum").arg(&wheel))?;
    if sum.split_whitespace().next() != Some(LIBPQ_WHEEL_SHA256) {
        bail!(
            "{} does not have the SHA-256 PyPI lists for {LIBPQ_WHEEL} ({LIBPQ_WHEEL_SHA256}): {sum}",
            wheel.display()
        );
    }
    // Unpacked beside its final place, then moved: a half-unpacked wheel
    // never counts as installed.
    let partial = clients.join("psycopg-binary.partial");
    let _ = fs::remove_dir_all(&partial);
    fs::create_dir_all(&clients)?;
    run(cmd("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&partial))?;
    let partial_libs = partial.join("psycopg_binary.libs");
    let libpq = fs::read_dir(&partial_libs)
        .with_context(|| format!("the wheel has no {}", partial_libs.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .find(|name| name.to_string_lossy().starts_with("libpq-"))
        .context("the wheel bundles no libpq")?;
    std::os::unix::fs::symlink(&libpq, partial_libs.join("libpq.so.5"))?;
    let _ = fs::remove_dir_all(&unpacked);
    fs::rename(&partial, &unpacked)?;
    report(
        TASK,
        step,
        format!("installed ({})", libpq.to_string_lossy()),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provided_packages_count_as_present() {
        let list = "ii \tnodejs\tnodejs-dev, nodejs-doc, npm\n\
                    un \tchromium\t\n\
                    rc \tpgbouncer\t\n\
                    ii \tlibc6:amd64\tlibc6-x (= 1)\n";
        let present = parse_installed(list);
        assert!(present.contains("nodejs"));
        assert!(present.contains("npm"));
        assert!(present.contains("libc6"));
        assert!(present.contains("libc6-x"));
        assert!(!present.contains("chromium"));
        assert!(!present.contains("pgbouncer"));
    }

    #[test]
    fn llvm_library_name_gives_major_and_link_name() {
        let llvm = parse_llvm_file_name("libLLVM-22-rust-1.97.0-nightly.so").unwrap();
        assert_eq!(llvm.major, 22);
        assert_eq!(llvm.link_name, "LLVM-22-rust-1.97.0-nightly");
        assert!(parse_llvm_file_name("libLLVM.so.22.1-rust-1.97.0-nightly").is_none());
        assert!(parse_llvm_file_name("librustc_driver-b5a9.so").is_none());
    }

    #[test]
    fn bpffs_is_found_by_mount_point_and_type() {
        assert!(is_bpffs_mounted(
            "tmpfs /tmp tmpfs rw 0 0\nbpf /sys/fs/bpf bpf rw,relatime 0 0\n"
        ));
        assert!(!is_bpffs_mounted("none /sys/fs/bpf tmpfs rw 0 0\n"));
    }
}
