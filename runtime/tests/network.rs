//! The container's network namespace reaching the workload inside the VM, on
//! real microVMs: two network namespaces joined by a veth (the "container" side,
//! whose path the config names, and a "far" side with an HTTP server), traffic
//! both ways over IPv4 and IPv6, and nothing left in the namespace afterwards.

mod common;

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const MTU: u32 = 1400;

/// `ip netns` pair joined by a veth: `eth0` (10.77.0.2/24, fd77::2/64, default
/// routes via the far side) in the container namespace, `kv-far` (10.77.0.1,
/// fd77::1) in the far one. Removed on drop.
struct TestNet {
    ctr: String,
    far: String,
    servers: Vec<Child>,
}

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl TestNet {
    /// None (with the reason printed, or a failure under KRUN_OCI_REQUIRE_VM=1)
    /// where network namespaces cannot be made (not root, no iproute2).
    fn new(tag: &str) -> Option<TestNet> {
        let n = TestNet {
            ctr: format!("krt-{}-{tag}-c", std::process::id()),
            far: format!("krt-{}-{tag}-f", std::process::id()),
            servers: Vec::new(),
        };
        let (c, f) = (n.ctr.as_str(), n.far.as_str());
        let mtu = MTU.to_string();
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", c],
            vec!["netns", "add", f],
            vec![
                "-n", f, "link", "add", "kv-far", "type", "veth", "peer", "name", "eth0", "netns",
                c,
            ],
            vec!["-n", f, "addr", "add", "10.77.0.1/24", "dev", "kv-far"],
            vec![
                "-n",
                f,
                "addr",
                "add",
                "fd77::1/64",
                "dev",
                "kv-far",
                "nodad",
            ],
            vec!["-n", f, "link", "set", "kv-far", "mtu", &mtu, "up"],
            vec!["-n", f, "link", "set", "lo", "up"],
            vec!["-n", c, "addr", "add", "10.77.0.2/24", "dev", "eth0"],
            vec!["-n", c, "addr", "add", "fd77::2/64", "dev", "eth0", "nodad"],
            vec!["-n", c, "link", "set", "eth0", "mtu", &mtu, "up"],
            vec!["-n", c, "route", "add", "default", "via", "10.77.0.1"],
            vec!["-n", c, "-6", "route", "add", "default", "via", "fd77::1"],
        ];
        for s in steps {
            if let Err(e) = ip(&s) {
                drop(n);
                if std::env::var("KRUN_OCI_REQUIRE_VM").as_deref() == Ok("1") {
                    panic!("network test needs network namespaces: {e}");
                }
                eprintln!("SKIPPED network test {tag}: cannot make network namespaces: {e}");
                return None;
            }
        }
        Some(n)
    }

    fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.ctr)
    }

    /// An HTTP server (busybox httpd, IPv4 and IPv6) on the far side serving `dir`.
    fn serve_far(&mut self, dir: &std::path::Path, port: u16) {
        let busybox = which("busybox").unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.far])
            .arg(busybox)
            .args(["httpd", "-f", "-p", &format!("[::]:{port}"), "-h"])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.servers.push(child);
        eventually("the far server to listen", Duration::from_secs(10), || {
            self.listening(port)
        });
    }

    fn listening(&self, port: u16) -> bool {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.far,
                "cat",
                "/proc/net/tcp6",
                "/proc/net/tcp",
            ])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).contains(&format!(
                    ":{port:04X} 00000000000000000000000000000000:0000 0A"
                ))
            })
            .unwrap_or(false)
    }

    /// `wget -O -` from the far side (a client of the guest's server).
    fn far_fetch(&self, url: &str) -> Result<String, String> {
        // busybox wget's own -T crashes (static build, Debian 12): bound it with timeout.
        let out = Command::new("ip")
            .args(["netns", "exec", &self.far, "timeout", "20"])
            .arg(which("busybox").unwrap())
            .args(["wget", "-q", "-O", "-", url])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// What krun-oci may have left in the container namespace: ingress qdiscs,
    /// filters, taps.
    fn leftovers(&self) -> Vec<String> {
        let mut out = Vec::new();
        let links = ip(&["-n", &self.ctr, "-o", "link", "show"]).unwrap_or_default();
        out.extend(
            links
                .lines()
                .filter(|l| l.contains("krtap"))
                .map(str::to_owned),
        );
        let tc = Command::new("tc")
            .args(["-n", &self.ctr, "qdisc", "show"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        out.extend(
            tc.lines()
                .filter(|l| l.contains("ingress"))
                .map(str::to_owned),
        );
        out
    }

    fn mac(&self) -> String {
        let l = ip(&["-n", &self.ctr, "-o", "link", "show", "eth0"]).unwrap();
        let i = l.find("link/ether ").unwrap() + "link/ether ".len();
        l[i..i + 17].to_string()
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = ip(&["netns", "del", &self.ctr]);
        let _ = ip(&["netns", "del", &self.far]);
    }
}

/// A VM test's network pair (`None`: the test is skipped, the reason printed).
fn net_test(test: &str, tag: &str) -> Option<TestNet> {
    if !vm_available(test) {
        return None;
    }
    let net = TestNet::new(tag)?;
    become_subreaper();
    Some(net)
}

fn bundle_in(net: &TestNet, args: &[&str], annotations: serde_json::Value) -> TestBundle {
    let b = TestBundle::new(args);
    let path = net.netns_path();
    b.write_config(|c| {
        for ns in c["linux"]["namespaces"].as_array_mut().unwrap() {
            if ns["type"] == "network" {
                ns["path"] = serde_json::json!(path);
            }
        }
        c["annotations"] = annotations;
    });
    b
}

#[test]
fn the_netns_reaches_the_guest_both_ways_over_ipv4_and_ipv6() {
    both_ways("net_both_ways", "both", false);
}

/// The same on a pooled VM: its spare NIC's tap moves into the namespace while
/// the guest is set up, and the link's addresses reach the guest after `Setup`
/// (no `net.*` sysctl here, which would have them come in `Setup`).
#[test]
fn the_netns_reaches_a_pooled_vm_both_ways() {
    both_ways("net_pooled", "pool", true);
}

fn both_ways(test: &str, tag: &str, pooled: bool) {
    let Some(mut net) = net_test(test, tag) else {
        return;
    };
    let www = tempfile::tempdir().unwrap();
    let token = format!("far-file-{}", std::process::id());
    fs::write(www.path().join("f.txt"), &token).unwrap();
    net.serve_far(www.path(), 8000);
    let script =
        "ip -o link show eth0; ip -o addr show eth0; echo mtu=$(cat /sys/class/net/eth0/mtu); \
         ip -o link show lo; \
         echo v4=$(timeout 20 wget -q -O - http://10.77.0.1:8000/f.txt); \
         echo v6=$(timeout 20 wget -q -O - 'http://[fd77::1]:8000/f.txt'); \
         mkdir -p /www; echo guest-page > /www/index.html; httpd -p '[::]:80' -h /www; echo ready; \
         sleep 600";
    let rt = Runtime::new();
    let pool = pooled.then(|| common::pool::Pool::serve(&rt, 1));
    let b = bundle_in(&net, &["sh", "-c", script], serde_json::json!({}));
    let (out, err) = (b.path().join("out"), b.path().join("err"));
    let pid = rt.create(test, &b, &out, &err);
    let monitor_log =
        fs::read_to_string(rt.root.path().join(test).join("monitor.log")).unwrap_or_default();
    assert_eq!(
        monitor_log.contains("(pool hit)"),
        pooled,
        "pool hit: {monitor_log}"
    );
    let helpers = rt.helper_pids(test);
    rt.ok(&["start", test]);
    eventually("the guest's server", Duration::from_secs(120), || {
        fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("ready")
    });
    let got = fs::read_to_string(&out).unwrap();
    assert!(
        got.contains(&format!("v4={token}")),
        "{got}\n{}",
        fs::read_to_string(&err).unwrap_or_default()
    );
    assert!(got.contains(&format!("v6={token}")), "{got}");
    let mac = net.mac();
    assert!(
        got.contains(&format!("link/ether {mac}")),
        "guest eth0 has the veth's MAC {mac}: {got}"
    );
    assert!(got.contains("inet 10.77.0.2/24"), "{got}");
    assert!(got.contains("inet6 fd77::2/64"), "{got}");
    assert!(got.contains(&format!("mtu={MTU}")), "{got}");
    assert!(
        got.lines().any(|l| l.contains(": lo:") && l.contains("UP")),
        "lo is up: {got}"
    );
    // The far side reaches the guest's server.
    assert_eq!(net.far_fetch("http://10.77.0.2/").unwrap(), "guest-page\n");
    assert_eq!(net.far_fetch("http://[fd77::2]/").unwrap(), "guest-page\n");
    // While it runs, the link is redirected to our tap.
    assert!(
        !net.leftovers().is_empty(),
        "a tap and ingress qdiscs while running"
    );
    rt.ok(&["kill", test, "KILL"]);
    assert_eq!(wait_exit(pid), 137);
    rt.ok(&["delete", test]);
    assert_cleaned_up(&rt, test, &helpers);
    drop(pool);
    assert_eq!(net.leftovers(), Vec::<String>::new(), "left in the netns");
    // The netns keeps its own configuration.
    let addrs = ip(&["-n", &net.ctr, "-o", "addr", "show", "eth0"]).unwrap();
    assert!(addrs.contains("10.77.0.2/24"), "{addrs}");
}

/// The config's `net.*` sysctls apply after the NICs are configured, cold and on
/// a pooled VM alike: with IPv6 disabled, create succeeds and eth0 keeps no
/// global IPv6 address (had the sysctl come first, adding the link's IPv6
/// address would fail create).
#[test]
fn network_sysctls_apply_after_the_nics_cold_and_pooled() {
    const T: &str = "net_sysctl";
    let Some(net) = net_test(T, "sysctl") else {
        return;
    };
    for pooled in [false, true] {
        let rt = Runtime::new();
        let pool = pooled.then(|| common::pool::Pool::serve(&rt, 1));
        let script = "echo v6=$(ip -o -6 addr show dev eth0 scope global | wc -l)";
        let b = bundle_in(&net, &["sh", "-c", script], serde_json::json!({}));
        b.write_config(|c| {
            c["linux"]["sysctl"] = serde_json::json!({"net.ipv6.conf.all.disable_ipv6": "1"});
        });
        let (out, err) = (b.path().join("out"), b.path().join("err"));
        let pid = rt.create(T, &b, &out, &err);
        let monitor_log =
            fs::read_to_string(rt.root.path().join(T).join("monitor.log")).unwrap_or_default();
        assert_eq!(monitor_log.contains("(pool hit)"), pooled, "{monitor_log}");
        let helpers = rt.helper_pids(T);
        rt.ok(&["start", T]);
        assert_eq!(wait_exit(pid), 0);
        let got = fs::read_to_string(&out).unwrap();
        assert!(got.contains("v6=0"), "pooled {pooled}: {got}");
        rt.ok(&["delete", T]);
        assert_cleaned_up(&rt, T, &helpers);
        drop(pool);
        assert_eq!(net.leftovers(), Vec::<String>::new(), "left in the netns");
    }
}

/// One link, one VM: a second container that insists on the link (`tap`) fails
/// cleanly without disturbing the first; a killed monitor's redirects are
/// removed by `delete`.
#[test]
fn a_claimed_link_is_not_taken_twice_and_delete_cleans_after_a_killed_monitor() {
    const T: &str = "net_claim";
    let Some(net) = net_test(T, "claim") else {
        return;
    };
    let rt = Runtime::new();
    let a = bundle_in(&net, &["sleep", "600"], serde_json::json!({}));
    let (out, err) = (a.path().join("out"), a.path().join("err"));
    let pid = rt.create("first", &a, &out, &err);
    let helpers = rt.helper_pids("first");
    let claimed = net.leftovers();
    assert!(claimed.iter().any(|l| l.contains("krtap0")), "{claimed:?}");

    let b = bundle_in(
        &net,
        &["true"],
        serde_json::json!({"krun-oci.network": "tap"}),
    );
    let failed = rt.run(&["create", "--bundle", b.path().to_str().unwrap(), "second"]);
    assert_eq!(failed.status.code(), Some(1));
    let msg = String::from_utf8_lossy(&failed.stderr);
    assert!(msg.contains("already attached"), "{msg}");
    assert!(
        !rt.root.path().join("second").exists(),
        "failed create left its state"
    );
    assert_eq!(
        net.leftovers(),
        claimed,
        "the first VM's redirects untouched"
    );

    // A forced mode without a namespace path is refused before anything starts.
    let c = TestBundle::new(&["true"]);
    c.write_config(|c| c["annotations"] = serde_json::json!({"krun-oci.network": "tap"}));
    let refused = rt.run(&["create", "--bundle", c.path().to_str().unwrap(), "third"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("network namespace path"));

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert_eq!(wait_exit(pid), 137);
    assert!(
        !net.leftovers().is_empty(),
        "the killed monitor left its redirect"
    );
    rt.ok(&["delete", "first"]);
    assert_cleaned_up(&rt, "first", &helpers);
    assert_eq!(net.leftovers(), Vec::<String>::new(), "left in the netns");
}

/// `ctr run --cni`'s order: the config lists a network namespace without a path,
/// so the monitor makes a new one; a link appears in it (`/proc/<pid>/ns/net`)
/// between create and start, and start gives it to the VM's spare NIC.
#[test]
fn a_link_added_between_create_and_start_reaches_the_guest() {
    const T: &str = "net_late";
    let Some(mut net) = net_test(T, "late") else {
        return;
    };
    let www = tempfile::tempdir().unwrap();
    fs::write(www.path().join("f.txt"), "late-file").unwrap();
    net.serve_far(www.path(), 8000);
    let rt = Runtime::new();
    let b = TestBundle::new(&[
        "sh",
        "-c",
        "ip -o link show eth0; ip -o addr show eth0; echo mtu=$(cat /sys/class/net/eth0/mtu); \
         echo got=$(timeout 20 wget -q -O - http://10.77.0.1:8000/f.txt)",
    ]);
    let (out, err) = (b.path().join("out"), b.path().join("err"));
    let pid = rt.create(T, &b, &out, &err);
    let helpers = rt.helper_pids(T);
    // The monitor's namespace is new: not ours, and only loopback and the spare tap.
    let own = fs::read_link("/proc/self/ns/net").unwrap();
    assert_ne!(fs::read_link(format!("/proc/{pid}/ns/net")).unwrap(), own);
    // What a CNI plugin does: move the container end of a veth in and configure it.
    let mac = net.mac();
    let target = format!("/proc/{pid}/ns/net");
    let nsenter = |args: &[&str]| {
        let st = Command::new("nsenter")
            .arg(format!("--net={target}"))
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "nsenter {args:?}");
    };
    ip(&[
        "-n",
        &net.ctr,
        "link",
        "set",
        "eth0",
        "netns",
        &pid.to_string(),
    ])
    .unwrap();
    nsenter(&["ip", "addr", "add", "10.77.0.2/24", "dev", "eth0"]);
    nsenter(&["ip", "link", "set", "eth0", "mtu", &MTU.to_string(), "up"]);
    nsenter(&["ip", "route", "add", "default", "via", "10.77.0.1"]);
    rt.ok(&["start", T]);
    assert_eq!(
        wait_exit(pid),
        0,
        "{}",
        fs::read_to_string(&err).unwrap_or_default()
    );
    let got = fs::read_to_string(&out).unwrap();
    assert!(got.contains("got=late-file"), "{got}");
    assert!(
        got.contains(&format!("link/ether {mac}")),
        "the link's MAC {mac}: {got}"
    );
    assert!(got.contains("inet 10.77.0.2/24"), "{got}");
    assert!(got.contains(&format!("mtu={MTU}")), "{got}");
    rt.ok(&["delete", T]);
    assert_cleaned_up(&rt, T, &helpers);
}
