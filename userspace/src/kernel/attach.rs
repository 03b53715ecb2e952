//! Attaching the programs to a cgroup, pinning them, and adopting pins.
//!
//! Layout under the pin directory (bpffs):
//!
//! ```text
//! <pin_dir>/maps/PORTCULLIS_*   every map, pinned by name at load time
//! <pin_dir>/links/<program>     one bpf_link per program
//! ```
//!
//! Links are pinned so that enforcement outlives the daemon: while it is down
//! the redirect target refuses connections, so protected destinations fail
//! closed. A restarted daemon finds the links and adopts them (and the maps)
//! instead of attaching a second copy; only missing links are attached.

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    maps::SockHash,
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSockAddr, SkMsg, SockOps,
    },
    Ebpf, EbpfLoader,
};
use aya_log::EbpfLogger;
use portcullis_common::{map_names, program_names, Settings, SocketKey};

use super::{
    maps::{self, CompiledRule, ConnectionTable, Destinations, FastPath},
    EventReader, KernelError, SyncReport,
};
use crate::config::KernelConfig;

/// The object built by build.rs from ebpf/programs.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portcullis"));

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Attached (or adopted) kernel enforcement.
pub struct Enforcement {
    pin_dir: PathBuf,
    destinations: Destinations,
    connections: Arc<ConnectionTable>,
    /// None when the pinned maps predate the fast path (adopted from an
    /// older version): connections then simply take the TCP path.
    fast_path: Option<Arc<FastPath>>,
    /// Programs attached by this run; the others were adopted from pins.
    pub attached: Vec<&'static str>,
    pub adopted: Vec<&'static str>,
    /// Keeps aya-log's map open; dropping it would break later loads.
    logger: Option<KernelLogger>,
}

impl Enforcement {
    /// Attaches the programs to `kernel.cgroup` (or adopts pinned ones) with
    /// `rules` already in the trie, so no connect slips through between
    /// attach and configuration.
    pub fn start(kernel: &KernelConfig, rules: &[CompiledRule]) -> Result<Self, KernelError> {
        let cgroup_path = match &kernel.cgroup {
            Some(path) => path.clone(),
            None => root_cgroup()?,
        };
        let pin_dir = kernel.pin_dir.clone();
        ensure_bpffs_dir(&pin_dir)?;
        let maps_dir = pin_dir.join("maps");
        let links_dir = pin_dir.join("links");
        std::fs::create_dir_all(&maps_dir)?;
        std::fs::create_dir_all(&links_dir)?;

        let missing: Vec<&'static str> = program_names::ALL
            .into_iter()
            .filter(|name| !links_dir.join(name).exists())
            .collect();
        let adopted: Vec<&'static str> = program_names::ALL
            .into_iter()
            .filter(|name| !missing.contains(name))
            .collect();

        // Loading creates the pinned maps, or reuses them when they exist.
        let mut ebpf = if missing.is_empty() {
            None
        } else {
            Some(
                EbpfLoader::new()
                    .default_map_pin_directory(&maps_dir)
                    .load(PROGRAMS)
                    .map_err(|e| KernelError::Load(Box::new(e)))?,
            )
        };

        let settings = Settings {
            exempt_mark: kernel.exempt_mark,
            configured: 1,
            gateway_netns_cookie: own_netns_cookie()?,
        };
        maps::write_settings(&pin_dir, settings)?;
        let mut destinations = Destinations::open(&pin_dir)?;
        destinations.replace_all(rules)?;

        let logger = match ebpf.as_mut() {
            Some(ebpf) => EbpfLogger::init(ebpf).ok(),
            None => adopted_program_id(&links_dir).and_then(|id| EbpfLogger::init_from_id(id).ok()),
        };

        if let Some(ebpf) = ebpf.as_mut() {
            // Before sock_ops can add any socket: sockets added to the map
            // earlier would not get the program.
            let attached = attach_fast_path(ebpf).and_then(|()| {
                File::open(&cgroup_path)
                    .map_err(|source| KernelError::Cgroup {
                        path: cgroup_path.clone(),
                        source,
                    })
                    .and_then(|cgroup| {
                        missing.iter().try_for_each(|name| {
                            attach_and_pin(ebpf, name, &cgroup, &links_dir.join(name))
                        })
                    })
            });
            if let Err(e) = attached {
                if adopted.is_empty() {
                    // Nothing was enforced before us: leave nothing half-done.
                    let _ = detach(&pin_dir);
                }
                return Err(e);
            }
        }

        let connections = Arc::new(ConnectionTable::open(&pin_dir)?);
        let fast_path = match FastPath::open(&pin_dir) {
            Ok(fast_path) => Some(Arc::new(fast_path)),
            Err(e) => {
                tracing::warn!("no kernel fast path for local clients: {e}");
                None
            }
        };
        Ok(Self {
            pin_dir,
            destinations,
            connections,
            fast_path,
            attached: missing,
            adopted,
            logger,
        })
    }

    /// Replaces the protected set (config reload).
    pub fn update_rules(&mut self, rules: &[CompiledRule]) -> Result<SyncReport, KernelError> {
        self.destinations.replace_all(rules)
    }

    pub fn connections(&self) -> Arc<ConnectionTable> {
        Arc::clone(&self.connections)
    }

    pub fn fast_path(&self) -> Option<Arc<FastPath>> {
        self.fast_path.clone()
    }

    pub fn events(&self) -> Result<EventReader, KernelError> {
        EventReader::open(&self.pin_dir)
    }

    /// Hands over aya-log's reader (once), for a task that forwards kernel
    /// log records into our log whenever its fd becomes readable.
    pub fn take_kernel_logger(&mut self) -> Option<KernelLogger> {
        self.logger.take()
    }
}

/// Reader of the log records written by the kernel programs with aya-log.
pub type KernelLogger = EbpfLogger<&'static dyn log::Log>;

fn attach_and_pin(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup: &File,
    pin_path: &Path,
) -> Result<(), KernelError> {
    let program_err = |e| program_error(name, e);
    let program = ebpf.program_mut(name).ok_or_else(|| KernelError::Program {
        name,
        message: "not found in the eBPF object (build mismatch?)".into(),
    })?;
    // SockOps and CgroupSockAddr attach alike but share no trait.
    macro_rules! attach_to_cgroup {
        ($kind:ty) => {{
            let program: &mut $kind = program.try_into().map_err(program_err)?;
            program.load().map_err(program_err)?;
            let id = program
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(program_err)?;
            FdLink::try_from(program.take_link(id).map_err(program_err)?)
                .map_err(|e| pin_error(pin_path, e))?
        }};
    }
    let link = if name == program_names::SOCK_OPS {
        attach_to_cgroup!(SockOps)
    } else {
        attach_to_cgroup!(CgroupSockAddr)
    };
    link.pin(pin_path).map_err(|e| pin_error(pin_path, e))?;
    Ok(())
}

/// Attaches the `fast_path` program to the pinned fast-path map. The
/// attachment belongs to the map, not to this process: it stays while the
/// map is pinned (the next daemon adopts it) and goes when `detach` unpins
/// the map. So the link is deliberately not dropped, which would detach it.
fn attach_fast_path(ebpf: &mut Ebpf) -> Result<(), KernelError> {
    let name = program_names::FAST_PATH;
    let program_err = |e| program_error(name, e);
    // A clone of the map's fd: the map itself stays in the object, whose
    // other programs are loaded against it.
    let map = ebpf
        .map(map_names::FAST_PATH)
        .ok_or_else(|| KernelError::Program {
            name,
            message: "its map is not in the eBPF object (build mismatch?)".into(),
        })?;
    let map_err = |e: aya::maps::MapError| KernelError::Map {
        name: map_names::FAST_PATH,
        source: Box::new(e),
    };
    let map_fd = SockHash::<_, SocketKey>::try_from(map)
        .map_err(map_err)?
        .fd()
        .try_clone()?;
    let program: &mut SkMsg = ebpf
        .program_mut(name)
        .ok_or_else(|| KernelError::Program {
            name,
            message: "not found in the eBPF object (build mismatch?)".into(),
        })?
        .try_into()
        .map_err(program_err)?;
    program.load().map_err(program_err)?;
    let id = program.attach(&map_fd).map_err(program_err)?;
    let link = program.take_link(id).map_err(program_err)?;
    std::mem::forget(link);
    Ok(())
}

/// Keeps a verifier rejection readable: the error and the log's last lines,
/// which say why (the full log runs to thousands of lines).
fn pin_error(path: &Path, error: impl std::error::Error + Send + Sync + 'static) -> KernelError {
    KernelError::Pin {
        path: path.to_owned(),
        source: Box::new(error),
    }
}

fn program_error(name: &'static str, error: aya::programs::ProgramError) -> KernelError {
    const TAIL: usize = 12;
    let message = match error {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(TAIL)..].join("\n  ");
            format!("the kernel verifier rejected it ({io_error}); end of its log:\n  {tail}")
        }
        other => other.to_string(),
    };
    KernelError::Program { name, message }
}

/// The program id behind any pinned link, to find aya-log's map again.
fn adopted_program_id(links_dir: &Path) -> Option<u32> {
    let link = PinnedLink::from_pin(links_dir.join(program_names::CONNECT4)).ok()?;
    let link: FdLink = link.into();
    link.info().ok().map(|info| info.program_id())
}

/// Removes every pin: links first (that detaches the programs), then maps.
/// Returns the paths removed. Missing pins are not an error.
pub fn detach(pin_dir: &Path) -> Result<Vec<PathBuf>, KernelError> {
    let mut removed = Vec::new();
    for sub in ["links", "maps"] {
        let dir = pin_dir.join(sub);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            std::fs::remove_file(&path)?;
            removed.push(path);
        }
        std::fs::remove_dir(&dir)?;
    }
    if pin_dir.exists() {
        std::fs::remove_dir(pin_dir)?;
        removed.push(pin_dir.to_owned());
    }
    Ok(removed)
}

/// Mount point of the cgroup v2 hierarchy, from /proc/self/mounts.
pub fn root_cgroup() -> Result<PathBuf, KernelError> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, mount_point, fs_type) = (fields.next()?, fields.next()?, fields.next()?);
            (fs_type == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .next()
        .ok_or(KernelError::NoCgroup2)
}

/// Checks that the pin directory's parent is on bpffs. The standard place,
/// /sys/fs/bpf, is mounted if it is not yet (as systemd would at boot).
fn ensure_bpffs_dir(pin_dir: &Path) -> Result<(), KernelError> {
    let parent = pin_dir.parent().unwrap_or(Path::new("/"));
    if is_bpffs(parent) {
        return Ok(());
    }
    if parent == Path::new("/sys/fs/bpf") {
        // SAFETY: all arguments are valid NUL-terminated strings or null.
        let rc = unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                c"/sys/fs/bpf".as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc == 0 && is_bpffs(parent) {
            tracing::info!("mounted bpffs on /sys/fs/bpf");
            return Ok(());
        }
    }
    Err(KernelError::NotBpffs(parent.to_owned()))
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we pass; path is a valid
    // NUL-terminated string that outlives the call.
    unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        libc::statfs(path.as_ptr(), &mut stat) == 0 && stat.f_type == BPF_FS_MAGIC
    }
}

/// Cookie of this process's network namespace (SO_NETNS_COOKIE, Linux 5.14).
fn own_netns_cookie() -> Result<u64, KernelError> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the out-pointer and length describe `cookie`, a live u64.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(KernelError::Io(std::io::Error::last_os_error()));
    }
    Ok(cookie)
}
