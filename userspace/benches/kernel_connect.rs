//! connect() rate with the kernel programs attached, against the same
//! without them, measured in one run (as root).
//!
//! A child process, placed in a throwaway child cgroup, opens and closes
//! TCP connections in a loop to two local acceptors:
//!
//! * unprotected: 127.0.0.1:A, never in the protected set;
//! * protected: 127.0.0.1:B, redirected by the programs to A when they are
//!   attached (without programs the connect simply reaches B);
//! * blocked: 127.0.0.1:C, refused with EPERM when attached (reported for
//!   information: without programs it is an ordinary refused connect).
//!
//! Rounds alternate detached/attached so drift affects both alike; the
//! median of each is reported, with the attached/detached ratio.
//!
//! Run: `cargo bench --bench kernel_connect` (or `cargo xtask bench`).

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use portcullis::{
    config::Config,
    kernel::{self, Enforcement},
};
use portcullis_testkit::cgroup::Cgroup;

const CONNECTS: usize = 20_000;
const ROUNDS: usize = 5;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--connect-loop") {
        connect_loop(args[2].parse().unwrap(), args[3].parse().unwrap());
        return;
    }
    if args.iter().any(|a| a == "--list") {
        // libtest-style listing so `cargo bench -- --list` and friends work.
        println!("kernel_connect: bench");
        return;
    }
    run_benchmark();
}

/// The measured loop: N × (socket, connect, close). Prints connects/second.
fn connect_loop(addr: SocketAddr, count: usize) {
    let started = Instant::now();
    let mut failures = 0usize;
    for _ in 0..count {
        match TcpStream::connect(addr) {
            // Close with RST (linger 0): no TIME_WAIT, so hundreds of
            // thousands of connects do not exhaust the ephemeral ports.
            Ok(stream) => {
                let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            }
            Err(_) => failures += 1,
        }
    }
    let rate = count as f64 / started.elapsed().as_secs_f64();
    println!("{rate:.0} {failures}");
}

/// Accepts and drops connections until the process ends.
fn acceptor() -> TcpListener {
    // A deep backlog: a full accept queue drops SYNs and turns the
    // measurement into one of SYN retransmit timers.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    socket.bind(&any.into()).unwrap();
    socket.listen(4096).unwrap();
    let listener: TcpListener = socket.into();
    let accepting = listener.try_clone().unwrap();
    std::thread::spawn(move || {
        for stream in accepting.incoming() {
            drop(stream);
        }
    });
    listener
}

struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = kernel::detach(&self.0);
    }
}

fn measure(cgroup: &Cgroup, addr: SocketAddr) -> (f64, usize) {
    let exe = std::env::current_exe().unwrap();
    let out = cgroup
        .command(
            exe.to_str().unwrap(),
            &["--connect-loop", &addr.to_string(), &CONNECTS.to_string()],
        )
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text.split_whitespace();
    (
        fields.next().expect("rate").parse().unwrap(),
        fields.next().expect("failures").parse().unwrap(),
    )
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

fn run_benchmark() {
    let cgroup = Cgroup::create(
        &kernel::root_cgroup().unwrap(),
        &format!("portcullis-bench-{}", std::process::id()),
    );
    let pins = Pins(PathBuf::from(format!(
        "/sys/fs/bpf/portcullis-bench-{}",
        std::process::id()
    )));

    let unprotected = acceptor().local_addr().unwrap();
    let protected = acceptor().local_addr().unwrap();
    let blocked: SocketAddr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let config = Config::parse(&format!(
        r#"
        [kernel]
        cgroup = "{cg}"
        pin_dir = "{pins}"
        [[listener]]
        name = "sink"
        address = "{unprotected}"
        [[protect]]
        destination = "127.0.0.1"
        port = {p}
        to = "sink"
        [[protect]]
        destination = "127.0.0.1"
        port = {b}
        to = "block"
        "#,
        cg = cgroup.path.display(),
        pins = pins.0.display(),
        p = protected.port(),
        b = blocked.port(),
    ))
    .unwrap();
    let rules = kernel::compile_rules(&config).unwrap();

    let targets = [
        ("unprotected", unprotected),
        ("protected (redirect)", protected),
        ("protected (block)", blocked),
    ];
    let mut detached: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let mut attached: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for _ in 0..ROUNDS {
        for (i, (_, addr)) in targets.iter().enumerate() {
            detached[i].push(measure(&cgroup, *addr).0);
        }
        let enforcement = Enforcement::start(&config.kernel, &rules).expect("attach (run as root)");
        for (i, (name, addr)) in targets.iter().enumerate() {
            let (rate, failures) = measure(&cgroup, *addr);
            if *name != "protected (block)" {
                assert_eq!(
                    failures, 0,
                    "{name}: connects failed with programs attached"
                );
            } else {
                assert_eq!(failures, CONNECTS, "blocked connects must all fail");
            }
            attached[i].push(rate);
        }
        drop(enforcement);
        kernel::detach(&pins.0).unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }

    println!("connect() rate, {CONNECTS} connects x {ROUNDS} rounds, median (connects/s):");
    println!(
        "{:<22} {:>12} {:>12} {:>8}",
        "destination", "no programs", "attached", "ratio"
    );
    for (i, (name, _)) in targets.iter().enumerate() {
        let without = median(detached[i].clone());
        let with = median(attached[i].clone());
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            println!("  {name}: detached {:?}", detached[i]);
            println!("  {name}: attached {:?}", attached[i]);
        }
        println!(
            "{name:<22} {without:>12.0} {with:>12.0} {:>8.2}",
            with / without
        );
    }
}
