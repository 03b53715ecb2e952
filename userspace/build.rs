//! Builds the kernel programs (ebpf/programs) for the BPF target with
//! aya-build, so that a plain `cargo build` produces the whole gateway.
//! The object is embedded in the binary with `include_bytes_aligned!`.

use std::{path::Path, process::Command};

fn main() -> anyhow::Result<()> {
    check_toolchain()?;
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root_dir = Path::new(&manifest_dir).join("../ebpf/programs");
    let root_dir = root_dir
        .canonicalize()
        .map_err(|e| anyhow::anyhow!("{}: {e}", root_dir.display()))?;
    let root_dir = root_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", root_dir.display()))?;
    let package = aya_build::Package {
        name: "portcullis-ebpf",
        root_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}

/// What the kernel programs need beyond stable Rust, checked first so that
/// a machine without it gets told how to fix that, not a linker error from
/// deep inside the nested build.
fn check_toolchain() -> anyhow::Result<()> {
    let missing = |what: &str| {
        anyhow::anyhow!(
            "{what} is missing, and the kernel programs (ebpf/programs) are built with it: \
             run `cargo xtask setup` as root once (it installs what the build and the \
             tests need), then build again"
        )
    };
    let runs = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
    };
    if runs("bpf-linker", &["--version"]).is_none() {
        return Err(missing("bpf-linker"));
    }
    let sysroot = runs("rustup", &["run", "nightly", "rustc", "--print", "sysroot"])
        .ok_or_else(|| missing("the nightly Rust toolchain"))?;
    let sysroot = String::from_utf8_lossy(&sysroot.stdout);
    if !Path::new(sysroot.trim())
        .join("lib/rustlib/src/rust/library")
        .is_dir()
    {
        return Err(missing("the nightly toolchain's rust-src component"));
    }
    Ok(())
}
