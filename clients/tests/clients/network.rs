//! Networking: podman's default network (netavark bridge) and `ctr run --cni`,
//! with a server on the host that the guests fetch from.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use krun_oci_clients::command;
use krun_oci_testkit::wait::Poll;

use crate::check::Check;
use crate::podman::{detached, podman, wait_logged};
use crate::session::Shim;

/// The host server's port (on all addresses, so also the bridges' gateways).
const HOST_PORT: u16 = 18091;
/// What the host server serves at /host.txt.
const HOST_PAGE: &str = "from-the-host";

/// What the network scenarios set up on the host, once (the first that needs
/// it), and take down at the end of the run.
pub struct HostNetwork {
    www: PathBuf,
    server: Mutex<Option<Child>>,
    cni_net: String,
    cni_bridge: String,
    cni_conf: PathBuf,
    /// Set up: whether /opt/cni/bin is our link (to remove).
    cni: Mutex<Option<bool>>,
}

impl HostNetwork {
    pub fn new(work: &Path) -> HostNetwork {
        let pid = std::process::id();
        let cni_net = format!("krun-test-{pid}");
        HostNetwork {
            www: work.join("www-host"),
            server: Mutex::new(None),
            cni_conf: PathBuf::from(format!("/etc/cni/net.d/00-{cni_net}.conflist")),
            cni_bridge: format!("krbr{pid}"),
            cni_net,
            cni: Mutex::new(None),
        }
    }

    /// busybox httpd on the host, answering (as /proc/net/tcp shows a listener).
    fn serve(&self, c: &mut Check) -> bool {
        let mut server = self.server.lock().unwrap();
        if server.is_some() {
            return true;
        }
        let started = fs::create_dir_all(&self.www)
            .and_then(|()| fs::write(self.www.join("host.txt"), format!("{HOST_PAGE}\n")))
            .and_then(|()| {
                Command::new(krun_oci_testkit::rootfs::host_busybox().unwrap_or("busybox".into()))
                    .args(["httpd", "-f", "-p", &format!("0.0.0.0:{HOST_PORT}"), "-h"])
                    .arg(&self.www)
                    .stdin(Stdio::null())
                    .spawn()
            });
        match started {
            Ok(child) => *server = Some(child),
            Err(e) => {
                c.fail(format!("the host's test server: {e}"));
                return false;
            }
        }
        let listening = format!(":{HOST_PORT:04X} 00000000:0000 0A");
        let up = Poll::new(100, std::time::Duration::from_millis(100))
            .until(|| fs::read_to_string("/proc/net/tcp").is_ok_and(|t| t.contains(&listening)));
        if !up {
            c.fail("the host's test server did not listen");
        }
        up
    }

    /// A bridge + host-local + portmap conflist for ctr, which looks in the CNI
    /// defaults only: plugins in /opt/cni/bin (Debian's /usr/lib/cni, linked
    /// there where missing), configs in /etc/cni/net.d.
    fn set_up_cni(&self, c: &mut Check) -> bool {
        let mut cni = self.cni.lock().unwrap();
        if cni.is_some() {
            return true;
        }
        if !Path::new("/usr/lib/cni/bridge").is_file() {
            c.fail("containernetworking-plugins is not installed");
            return false;
        }
        let plugins = Path::new("/opt/cni/bin");
        let made_bin = plugins.symlink_metadata().is_err();
        let conflist = format!(
            r#"{{"cniVersion": "0.4.0", "name": "{net}", "plugins": [
  {{"type": "bridge", "bridge": "{bridge}", "isGateway": true, "ipMasq": false,
   "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "10.99.0.0/24", "gateway": "10.99.0.1"}}]],
            "routes": [{{"dst": "0.0.0.0/0"}}]}}}},
  {{"type": "portmap", "capabilities": {{"portMappings": true}}}}]}}
"#,
            net = self.cni_net,
            bridge = self.cni_bridge
        );
        let written = (|| -> std::io::Result<()> {
            if made_bin {
                fs::create_dir_all("/opt/cni")?;
                std::os::unix::fs::symlink("/usr/lib/cni", plugins)?;
            }
            fs::create_dir_all("/etc/cni/net.d")?;
            fs::write(&self.cni_conf, conflist)
        })();
        *cni = Some(made_bin);
        if let Err(e) = written {
            c.fail(format!("setting up CNI: {e}"));
            return false;
        }
        true
    }

    /// Stops the server and removes the CNI config, bridge and IPAM state.
    pub fn clean_up(&self) {
        if let Some(mut server) = self.server.lock().unwrap().take() {
            let _ = server.kill();
            let _ = server.wait();
        }
        let Some(made_bin) = self.cni.lock().unwrap().take() else {
            return;
        };
        let _ = fs::remove_file(&self.cni_conf);
        if made_bin {
            let _ = fs::remove_file("/opt/cni/bin");
            let _ = fs::remove_dir("/opt/cni");
        }
        command::output(Command::new("ip").args(["link", "del", &self.cni_bridge]));
        let _ = fs::remove_dir_all(Path::new("/var/lib/cni/networks").join(&self.cni_net));
        let results = format!("{}-", self.cni_net);
        for entry in fs::read_dir("/var/lib/cni/results")
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.file_name().to_string_lossy().starts_with(&results) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// podman's default network (netavark bridge, no --network none): a published
/// port reaches the guest's server from the host, the guest reaches the
/// bridge's gateway, and the guest resolves with the resolv.conf podman made.
pub fn podman_network(c: &mut Check) {
    if !c.s.network.serve(c) {
        return;
    }
    let script = format!(
        r#"mkdir -p /tmp/www; echo page-from-the-guest >/tmp/www/index.html
			gw=$(ip route | sed -n "s/^default via \([0-9.]*\).*/\1/p")
			echo "gateway=$gw fetched=$(timeout 20 wget -q -O - http://$gw:{HOST_PORT}/host.txt)"
			sed "s/^/resolv: /" /etc/resolv.conf
			httpd -p 80 -h /tmp/www; echo serving; while :; do sleep 1; done"#
    );
    let Some(cid) = detached(c, &["-p", "18080:80"], false, &["sh", "-c", &script]) else {
        return;
    };
    if wait_logged(c, &cid, "serving") {
        let page = command::combined(Command::new("curl").args([
            "-s",
            "-m",
            "30",
            "http://127.0.0.1:18080/",
        ]));
        c.expect_out("podman -p 18080:80", &page.stdout, "page-from-the-guest");
        let logs = podman(c, &["logs", &cid]).stdout;
        c.expect_out("podman network", &logs, &format!("fetched={HOST_PAGE}"));
        let path =
            command::output(
                &mut c
                    .s
                    .podman(&["inspect", "--format", "{{.ResolvConfPath}}", &cid]),
            );
        let resolv = fs::read_to_string(path.text()).unwrap_or_default();
        if resolv.trim().is_empty() {
            c.fail("podman network: podman made no resolv.conf");
        }
        for line in resolv.lines().filter(|l| !l.is_empty()) {
            let want = format!("resolv: {line}");
            if !logs.lines().any(|l| l == want) {
                c.fail(format!(
                    "podman network: the guest's resolv.conf lacks '{line}': {logs}"
                ));
            }
        }
    }
    if !podman(c, &["rm", "-f", &cid]).ok() {
        c.fail("podman rm failed");
    }
}

/// `ctr run --cni`: ctr runs CNI on /proc/<task pid>/ns/net between create and
/// start. The guest gets the address and reaches the bridge's gateway.
fn cni_scenario(c: &mut Check, shim: Shim, id: &str) {
    if !c.s.network.serve(c) || !c.s.network.set_up_cni(c) {
        return;
    }
    let script = format!(
        "ip -o -4 addr show eth0; echo \"fetched=$(timeout 20 wget -q -O - http://10.99.0.1:{HOST_PORT}/host.txt)\""
    );
    let mut cmd = c.s.ctr(&["run", "--rm", "--cni"]);
    cmd.args(c.s.runtime_flags(shim))
        .arg("--rootfs")
        .arg(&c.s.rootfs)
        .args([id, "sh", "-c", &script]);
    let out = command::combined(&mut cmd);
    c.expect_code("ctr run --cni", out.code, 0);
    c.expect_out("ctr run --cni", &out.stdout, "inet 10.99.0.");
    c.expect_out(
        "ctr run --cni",
        &out.stdout,
        &format!("fetched={HOST_PAGE}"),
    );
}

pub fn shim_cni(c: &mut Check) {
    cni_scenario(c, Shim::Krun, "kc");
}

pub fn runc_shim_cni(c: &mut Check) {
    cni_scenario(c, Shim::Runc, "rc");
}
