//! Kernel enforcement against the real kernel: redirect, block, IPv6,
//! v4-mapped, UDP, exemption, crash survival, adoption, reload, detach.

use std::{process::Command, thread, time::Duration};

use crate::harness::*;

/// Prints the errno name of a TCP connect, or "connected".
fn py_connect(family: &str, host: &str, port: u16) -> String {
    format!(
        "import socket, errno\n\
         s = socket.socket(socket.{family}, socket.SOCK_STREAM)\n\
         s.settimeout(5)\n\
         try:\n    s.connect(('{host}', {port})); print('connected')\n\
         except OSError as e:\n    print(errno.errorcode.get(e.errno, e.errno))\n"
    )
}

#[test]
fn curl_is_redirected_with_original_destination_and_uid() {
    let cgroup = TestCgroup::new();
    let upstream = HttpUpstream::start("127.0.0.1:0", "hello from upstream");
    let gateway = Gateway::start(
        &cgroup,
        &[Protect::redirect("127.0.0.1", upstream.addr.port())],
    );

    let url = format!("http://{}/", upstream.addr);
    let out = cgroup.run(
        "setpriv",
        &[
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "curl",
            "-sS",
            "-m",
            "10",
            &url,
        ],
    );
    assert!(
        out.status.success(),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from upstream");

    let start = gateway.wait_for_event("session_start", |e| e["event"] == "session_start");
    assert_eq!(start["original_destination"], upstream.addr.to_string());
    assert_eq!(start["uid"], 65534);
    assert_eq!(start["command"], "curl");
    assert!(start["pid"].as_u64().unwrap() > 0);
    let redirect = gateway.wait_for_event("kernel redirect", |e| e["action"] == "redirect");
    assert_eq!(redirect["original_destination"], upstream.addr.to_string());
    assert_eq!(redirect["uid"], 65534);
    gateway.wait_for_event("session_end", |e| {
        e["event"] == "session_end" && e["bytes_from_server"].as_u64() > Some(0)
    });
    // The gateway's own upstream connect was let through by its mark.
    let counters = &gateway.status_json()["counters"];
    let exempt = counters
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c[0] == "exempt")
        .unwrap()[1]
        .as_u64()
        .unwrap();
    assert!(exempt >= 1, "{counters}");
}

#[test]
fn blocked_destination_fails_with_eperm_and_is_reported() {
    let cgroup = TestCgroup::new();
    let port = free_port();
    let gateway = Gateway::start(&cgroup, &[Protect::block("127.0.0.0/8", Some(port))]);

    let result = cgroup.python(&py_connect("AF_INET", "127.0.0.9", port));
    assert_eq!(result, "EPERM");
    let event = gateway.wait_for_event("block", |e| e["action"] == "block");
    assert_eq!(event["original_destination"], format!("127.0.0.9:{port}"));
    assert_eq!(event["transport"], "tcp");
    assert_eq!(event["command"], "python3");

    // Other ports and processes outside the cgroup are untouched.
    let other = free_port();
    assert_eq!(
        cgroup.python(&py_connect("AF_INET", "127.0.0.9", other)),
        "ECONNREFUSED"
    );
}

#[test]
fn ipv6_and_v4_mapped_connects_are_redirected() {
    let cgroup = TestCgroup::new();
    let v6 = HttpUpstream::start("[::1]:0", "hello over v6");
    let v4 = HttpUpstream::start("127.0.0.1:0", "hello over mapped v4");
    let gateway = Gateway::start(
        &cgroup,
        &[
            Protect::redirect("::1", v6.addr.port()),
            Protect::redirect("127.0.0.1", v4.addr.port()),
        ],
    );

    let url = format!("http://[::1]:{}/", v6.addr.port());
    let out = cgroup.run("curl", &["-sS", "-6", "-m", "10", &url]);
    assert!(
        out.status.success(),
        "curl -6: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello over v6");
    gateway.wait_for_event("v6 session", |e| {
        e["event"] == "session_start" && e["original_destination"] == v6.addr.to_string()
    });

    // A dual-stack AF_INET6 socket reaching an IPv4 service goes through
    // connect6 with ::ffff:127.0.0.1.
    let code = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\n\
         s.settimeout(5)\n\
         s.connect(('::ffff:127.0.0.1', {port}))\n\
         s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n\
         data = b''\n\
         while True:\n    chunk = s.recv(4096)\n    if not chunk: break\n    data += chunk\n\
         print(data.split(b'\\r\\n\\r\\n', 1)[1].decode())\n",
        port = v4.addr.port()
    );
    assert_eq!(cgroup.python(&code), "hello over mapped v4");
    gateway.wait_for_event("mapped session", |e| {
        e["event"] == "session_start"
            && e["original_destination"] == v4.addr.to_string()
            && e["command"] == "python3"
    });
}

#[test]
fn udp_to_protected_destinations_is_blocked() {
    let cgroup = TestCgroup::new();
    let port = free_port();
    let gateway = Gateway::start(&cgroup, &[Protect::redirect("127.0.0.1", port)]);

    // Unconnected sendto(): the sendmsg4 hook.
    let sendto = format!(
        "import socket, errno\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         try:\n    s.sendto(b'x', ('127.0.0.1', {port})); print('sent')\n\
         except OSError as e:\n    print(errno.errorcode[e.errno])\n"
    );
    assert_eq!(cgroup.python(&sendto), "EPERM");
    gateway.wait_for_event("udp send block", |e| e["action"] == "udp_send_block");

    // Unconnected sendto() on an IPv6 socket to the mapped address: sendmsg6.
    let sendto6 = sendto
        .replace("AF_INET,", "AF_INET6,")
        .replace("('127.0.0.1'", "('::ffff:127.0.0.1'");
    assert_eq!(cgroup.python(&sendto6), "EPERM");

    // connect() on a UDP socket: the connect4 hook refuses, never redirects.
    let connect = format!(
        "import socket, errno\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         try:\n    s.connect(('127.0.0.1', {port})); print('connected')\n\
         except OSError as e:\n    print(errno.errorcode[e.errno])\n"
    );
    assert_eq!(cgroup.python(&connect), "EPERM");
    gateway.wait_for_event("udp connect block", |e| {
        e["action"] == "block" && e["transport"] == "udp"
    });
}

#[test]
fn only_the_gateway_is_exempt_not_other_processes_of_its_uid() {
    let cgroup = TestCgroup::new();
    let upstream = HttpUpstream::start("127.0.0.1:0", "ok");
    let port = upstream.addr.port();
    let gateway = Gateway::start(&cgroup, &[Protect::redirect("127.0.0.1", port)]);
    let mark = 0x5043_4c53u32; // the config default

    // A root process without CAP_NET_ADMIN cannot put the gateway's mark on
    // its socket, so its connect is redirected like any other.
    let code = format!(
        "import socket, errno\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n\
         try:\n    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, {mark}); print('mark set')\n\
         except OSError as e:\n    print(errno.errorcode[e.errno])\n\
         s.connect(('127.0.0.1', {port}))\n\
         print(s.getpeername()[1])\n\
         s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n\
         while s.recv(4096): pass\n"
    );
    let out = cgroup.run(
        "setpriv",
        &[
            "--inh-caps=-all",
            "--bounding-set=-all",
            "python3",
            "-c",
            &code,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines[0], "EPERM", "setting SO_MARK must need CAP_NET_ADMIN");
    assert_eq!(
        lines[1],
        gateway.listener.port().to_string(),
        "the uid-0 process must land on the gateway listener"
    );
    let start = gateway.wait_for_event("session", |e| e["event"] == "session_start");
    assert_eq!(start["uid"], 0);
    // ... while the gateway, same uid, reached the upstream itself.
    gateway.wait_for_event("relayed", |e| {
        e["event"] == "session_end" && e["error"].is_null()
    });
    assert!(upstream.accepted.load(std::sync::atomic::Ordering::Relaxed) >= 1);
}

#[test]
fn enforcement_survives_kill_9_and_is_adopted_on_restart() {
    let cgroup = TestCgroup::new();
    let upstream = HttpUpstream::start("127.0.0.1:0", "back again");
    let port = upstream.addr.port();
    let mut gateway = Gateway::start(&cgroup, &[Protect::redirect("127.0.0.1", port)]);
    let ids_before = gateway.program_ids();
    assert_eq!(ids_before.len(), 5);

    gateway.kill9();
    // Fail closed: the redirect still happens, and nobody is listening.
    assert_eq!(
        cgroup.python(&py_connect("AF_INET", "127.0.0.1", port)),
        "ECONNREFUSED"
    );
    assert_eq!(
        upstream.accepted.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_eq!(gateway.program_ids(), ids_before);

    gateway.spawn();
    assert!(
        gateway.log().contains(
            r#"attached=[] adopted=["connect4", "connect6", "sendmsg4", "sendmsg6", "sock_ops"]"#
        ),
        "restart must adopt the pinned programs: {}",
        gateway.log()
    );
    assert_eq!(gateway.program_ids(), ids_before, "no second copy attached");
    let attached = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&cgroup.path)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&attached.stdout);
    assert_eq!(listing.matches("connect4").count(), 1, "{listing}");

    // The adopted programs work, and the event emitted while the daemon was
    // down was kept in the ring buffer and recorded after the restart.
    let url = format!("http://{}/", upstream.addr);
    let out = cgroup.run("curl", &["-sS", "-m", "10", &url]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "back again");
    let redirects = || {
        gateway
            .events()
            .iter()
            .filter(|e| e["action"] == "redirect")
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while redirects() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "{:#?}",
            gateway.events()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn connection_without_kernel_record_is_refused() {
    let cgroup = TestCgroup::new();
    let gateway = Gateway::start(&cgroup, &[]);
    // The test process is outside the cgroup: its connect is not redirected,
    // so the gateway has no kernel record for it.
    let received = read_all_from(gateway.listener).unwrap();
    assert!(received.is_empty());
    let refused = gateway.wait_for_event("refusal", |e| e["event"] == "connection_refused");
    assert!(refused["reason"]
        .as_str()
        .unwrap()
        .contains("no kernel record"));
}

#[test]
fn reload_swaps_the_protected_set_without_a_gap() {
    let cgroup = TestCgroup::new();
    let kept = free_port();
    let dropped = free_port();
    let added = free_port();
    let gateway = Gateway::start(
        &cgroup,
        &[
            Protect::block("127.0.0.1", Some(kept)),
            Protect::block("127.0.0.1", Some(dropped)),
        ],
    );
    // Hammer the destination that stays protected while reloading.
    let hammer = format!(
        "import socket, errno, time\n\
         seen = set()\n\
         end = time.time() + 1.5\n\
         while time.time() < end:\n    s = socket.socket()\n    \
         try:\n        s.connect(('127.0.0.1', {kept})); seen.add('connected')\n    \
         except OSError as e:\n        seen.add(errno.errorcode[e.errno])\n    s.close()\n\
         print(','.join(sorted(seen)))\n"
    );
    let child = cgroup
        .command("python3", &["-c", &hammer])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let alternate = [
        vec![
            Protect::block("127.0.0.1", Some(kept)),
            Protect::block("127.0.0.1", Some(added)),
        ],
        vec![
            Protect::block("127.0.0.0/8", Some(kept)),
            Protect::block("127.0.0.1", Some(kept)),
            Protect::block("127.0.0.1", Some(added)),
        ],
    ];
    let mut child = child;
    let mut reloads = 0;
    while child.try_wait().unwrap().is_none() {
        gateway.write_config(&alternate[reloads % 2]);
        gateway.signal("HUP");
        reloads += 1;
        // A reload waits until the file has read the same for 100 ms.
        thread::sleep(Duration::from_millis(150));
    }
    assert!(
        reloads >= 5,
        "the hammer finished before the reloads ({reloads})"
    );
    gateway.wait_for_log_count("protected set reloaded", 5, Duration::from_secs(10));
    let out = wait_with_timeout(child, Duration::from_secs(60));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "EPERM");

    assert_eq!(
        cgroup.python(&py_connect("AF_INET", "127.0.0.1", added)),
        "EPERM"
    );
    assert_eq!(
        cgroup.python(&py_connect("AF_INET", "127.0.0.1", dropped)),
        "ECONNREFUSED"
    );

    // An invalid file is rejected and the running set stays.
    std::fs::write(
        &gateway.config_path,
        "[[protect]]\ndestination = \"nonsense\"\n",
    )
    .unwrap();
    gateway.signal("HUP");
    let rejected = |times: usize| {
        gateway.wait_for_log_count("config reload rejected", times, Duration::from_secs(10));
    };
    rejected(1);
    assert_eq!(
        cgroup.python(&py_connect("AF_INET", "127.0.0.1", added)),
        "EPERM"
    );

    // So is a valid file that protects nothing (emptied, or cut short
    // before its first [[protect]]): that fails closed.
    gateway.write_config(&[]);
    gateway.signal("HUP");
    rejected(2);
    gateway.wait_for_log("the new config protects no destination");
    assert_eq!(
        cgroup.python(&py_connect("AF_INET", "127.0.0.1", added)),
        "EPERM"
    );

    // Dropping some rules works, and the log names what is no longer
    // protected.
    gateway.write_config(&[Protect::block("127.0.0.1", Some(kept))]);
    gateway.signal("HUP");
    gateway.wait_for_log_count("reload stopped protecting", 1, Duration::from_secs(10));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cgroup.python(&py_connect("AF_INET", "127.0.0.1", added)) != "ECONNREFUSED" {
        assert!(std::time::Instant::now() < deadline, "{}", gateway.log());
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        cgroup.python(&py_connect("AF_INET", "127.0.0.1", kept)),
        "EPERM"
    );
}

/// A reload waits until the config file reads the same twice (up to 3 s).
/// A SIGTERM meanwhile stops the daemon at once: the reload is abandoned,
/// not finished first.
#[test]
fn stop_during_a_reload_wait_abandons_the_reload() {
    let cgroup = TestCgroup::new();
    let port = free_port();
    let mut gateway = Gateway::start(&cgroup, &[Protect::block("127.0.0.1", Some(port))]);
    // A config that keeps changing, as if a deploy tool were still
    // writing it: the reload keeps waiting for it to settle.
    let writing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writer = {
        let writing = std::sync::Arc::clone(&writing);
        let path = gateway.config_path.clone();
        thread::spawn(move || {
            use std::io::Write;
            let mut n = 0;
            while writing.load(std::sync::atomic::Ordering::Relaxed) {
                let mut file = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .unwrap();
                writeln!(file, "# still writing {n}").unwrap();
                n += 1;
                thread::sleep(Duration::from_millis(20));
            }
        })
    };
    gateway.signal("HUP");
    thread::sleep(Duration::from_millis(300));
    gateway.stop();
    writing.store(false, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    let log = gateway.log();
    assert!(log.contains("config reload abandoned: stopping"), "{log}");
    // Without abandoning, the reload would have waited out its 3 s and
    // been rejected before the daemon stopped.
    assert!(!log.contains("config reload rejected"), "{log}");
    assert!(log.contains("shutting down"), "{log}");
}

#[test]
fn detach_leaves_nothing_behind() {
    let cgroup = TestCgroup::new();
    let port = free_port();
    let mut gateway = Gateway::start(&cgroup, &[Protect::block("127.0.0.1", Some(port))]);
    let ids = gateway.program_ids();
    assert_eq!(ids.len(), 5);
    gateway.kill9();

    let out = gateway.detach();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!gateway.pin_dir.exists(), "pin directory must be gone");
    for id in ids {
        let shown = Command::new("bpftool")
            .args(["prog", "show", "id", &id.to_string()])
            .output()
            .unwrap();
        assert!(!shown.status.success(), "program {id} still loaded");
    }
    let attached = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&cgroup.path)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&attached.stdout).trim().is_empty());
    // And connects work again.
    assert_eq!(
        cgroup.python(&py_connect("AF_INET", "127.0.0.1", port)),
        "ECONNREFUSED"
    );
    let status = gateway.status_json();
    assert!(status["programs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["link_id"].is_null()));
}
