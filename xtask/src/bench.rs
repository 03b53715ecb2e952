//! `cargo xtask bench`: every benchmark, after setup, as root.
//!
//! The benchmarks live in userspace/benches (harness = false): each measures
//! Portcullis against a direct connection (and PgBouncer where it applies)
//! in the same run and prints ratios. They need root (kernel programs,
//! throwaway PostgreSQL clusters run as the postgres user).

use anyhow::Result;

use crate::{
    setup,
    util::{cargo, report, run},
};

/// The benches, in the order they run; `only` picks one by name.
const BENCHES: [&str; 4] = ["kernel_connect", "postgres", "masking", "audit"];

pub fn bench(only: Option<&str>) -> Result<()> {
    setup::run_all()?;
    for name in BENCHES
        .iter()
        .filter(|name| only.is_none_or(|o| o == **name))
    {
        run(cargo().args(["bench", "-p", "portcullis", "--bench", name]))?;
    }
    report("bench", only.unwrap_or("all"), "done");
    Ok(())
}
