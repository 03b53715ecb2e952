//! A throwaway child cgroup: the only place tests and benches attach the
//! kernel programs to, never the machine's root cgroup.

use std::{
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

/// A child of the cgroup v2 root. Dropping it kills whatever still runs in
/// it, then removes it, which also detaches any program still attached.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    /// Creates `root/name`; `root` is the cgroup v2 mount
    /// (`portcullis::kernel::root_cgroup`).
    pub fn create(root: &Path, name: &str) -> Self {
        let path = root.join(name);
        std::fs::create_dir(&path).unwrap_or_else(|e| {
            panic!(
                "creating the child cgroup {} (run as root): {e}",
                path.display()
            )
        });
        Self { path }
    }

    /// Takes charge of an existing cgroup, to remove it on drop (what a run
    /// killed before its guards ran left behind).
    pub fn adopt(path: PathBuf) -> Self {
        Self { path }
    }

    /// A command that runs `program args...` inside this cgroup.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec \"$@\"",
                self.path.display()
            ))
            .arg("sh")
            .arg(program)
            .args(args);
        cmd
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            let procs = std::fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
            if procs.trim().is_empty() {
                break;
            }
            for pid in procs.split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
            thread::sleep(Duration::from_millis(20));
        }
        // A killed process leaves the cgroup a moment after it leaves
        // `cgroup.procs`: until then removing it fails as busy.
        for _ in 0..50 {
            match std::fs::remove_dir(&self.path) {
                Err(e) if e.kind() == std::io::ErrorKind::ResourceBusy => {
                    thread::sleep(Duration::from_millis(20))
                }
                _ => break,
            }
        }
    }
}
