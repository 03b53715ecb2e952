//! Builds the kernel programs (ebpf/programs) for the BPF target with
//! aya-build, so that a plain `cargo build` produces the whole gateway.
//! The object is embedded in the binary with `include_bytes_aligned!`.

use std::path::Path;

fn main() -> anyhow::Result<()> {
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
