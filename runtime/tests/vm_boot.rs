//! End-to-end: build the guest image from scratch, boot real VMs with the backend
//! `auto` selects (QEMU + TCG on hosts without usable hardware KVM), and check
//! that nothing of a VM outlives it.
//!
//! `boots_and_powers_off` and `helper_death_stops_the_vm` use a busybox test init
//! (a shell script as /init plus busybox in the initramfs), so they prove boot,
//! the virtio-fs root and the supervision without krun-oci-init.
//! `real_init_link` uses krun-oci-init and proves the host <-> guest link; it skips,
//! saying why, when that binary is not built.
//!
//! At most two VMs run at once (file-lock slots shared by all test processes).

use std::fs::{self, File};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use krun_oci::guest::GuestLink;
use krun_oci::image::{self, kernel, GuestImage, ImageOptions};
use krun_oci::vmm::{detect, Vm, VmExit, VmSpec, VmmChoice};
use krun_oci_protocol as proto;
use nix::fcntl::{Flock, FlockArg};

const BUSYBOX: &str = "/bin/busybox";

/// One of two global VM slots, held for the test's lifetime.
fn vm_slot() -> Flock<File> {
    loop {
        for i in 0..2 {
            let f =
                File::create(std::env::temp_dir().join(format!("krun-oci-vm-test-slot-{i}.lock")))
                    .unwrap();
            if let Ok(l) = Flock::lock(f, FlockArg::LockExclusiveNonblock) {
                return l;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The test cache: wiped once per run so the image is built from scratch
/// (set KRUN_OCI_TEST_KEEP_CACHE=1 to reuse it while iterating).
fn cache_dir() -> PathBuf {
    static WIPED: OnceLock<PathBuf> = OnceLock::new();
    WIPED
        .get_or_init(|| {
            let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vm_boot-cache");
            if std::env::var_os("KRUN_OCI_TEST_KEEP_CACHE").is_none() {
                let _ = fs::remove_dir_all(&d);
            }
            d
        })
        .clone()
}

const TEST_INIT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mkdir -p /proc /newroot
$B mount -t proc proc /proc
while read m; do $B insmod /krun-oci/$m || echo "insmod $m failed"; done < /krun-oci/modules
$B mount -t virtiofs rootfs /newroot || echo "virtiofs mount failed"
echo "guest says hi" > /newroot/from-guest
if [ "$($B cat /newroot/mode)" = stay ]; then
  echo up > /newroot/ready
  while :; do $B sleep 1; done
fi
$B sync
$B umount /newroot
$B poweroff -f
"#;

fn test_init_image() -> GuestImage {
    static IMG: Mutex<Option<GuestImage>> = Mutex::new(None);
    let mut g = IMG.lock().unwrap();
    if let Some(i) = &*g {
        return i.clone();
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vm_boot-init");
    fs::create_dir_all(&dir).unwrap();
    let init = dir.join("test-init.sh");
    fs::write(&init, TEST_INIT).unwrap();
    let opts = ImageOptions {
        cache_dir: Some(cache_dir()),
        kernel: std::env::var_os("KRUN_OCI_KERNEL").map(PathBuf::from),
        init: Some(init),
        extra_files: vec![("bin/busybox".into(), BUSYBOX.into())],
        ..Default::default()
    };
    let t0 = Instant::now();
    let img = image::ensure(&opts).expect("guest image");
    eprintln!("guest image ready in {:?}: {img:?}", t0.elapsed());
    *g = Some(img.clone());
    img
}

/// A busybox rootfs; `mode` tells the test init whether to power off or stay up.
fn rootfs(dir: &Path, mode: &str) -> PathBuf {
    let r = dir.join("rootfs");
    fs::create_dir_all(r.join("bin")).unwrap();
    fs::copy(BUSYBOX, r.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", r.join("bin/sh")).unwrap();
    fs::write(r.join("mode"), mode).unwrap();
    r
}

fn spec(dir: &Path, rootfs: PathBuf) -> VmSpec {
    let run_dir = dir.join("run");
    fs::create_dir_all(&run_dir).unwrap();
    VmSpec {
        id: "t".into(),
        run_dir,
        rootfs,
        vcpus: 2,
        ram_mib: 256,
        mounts: None,
        nics: Vec::new(),
        deferred_root: false,
        rootfs_cache: Default::default(),
    }
}

/// Polls `cond` until true, failing early (with the console) if the VM exits.
fn wait_for(
    vm: &mut dyn Vm,
    what: &str,
    limit: Duration,
    mut cond: impl FnMut() -> bool,
) -> Duration {
    let t0 = Instant::now();
    loop {
        if cond() {
            return t0.elapsed();
        }
        if let Some(e) = vm.try_wait().unwrap() {
            panic!(
                "VM exited ({e:?}) while waiting for {what}; console:\n{}",
                vm.console_tail(4000)
            );
        }
        assert!(
            t0.elapsed() < limit,
            "timed out waiting for {what}; console:\n{}",
            vm.console_tail(4000)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_exit(vm: &mut dyn Vm, limit: Duration) -> VmExit {
    let t0 = Instant::now();
    loop {
        if let Some(e) = vm.try_wait().unwrap() {
            return e;
        }
        assert!(
            t0.elapsed() < limit,
            "VM did not exit; console:\n{}",
            vm.console_tail(4000)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Nothing of the VM is left: no process, no process mentioning its run dir, no socket.
fn assert_nothing_left(pids: &[i32], run_dir: &Path) {
    for p in pids {
        assert!(
            !Path::new(&format!("/proc/{p}")).exists(),
            "pid {p} still exists"
        );
    }
    let needle = run_dir.to_string_lossy().into_owned();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            assert!(
                !cmd.contains(&needle),
                "process {:?} still runs: {cmd}",
                e.file_name()
            );
        }
    }
    let allowed = [
        "console.log",
        "qemu.log",
        "virtiofsd.log",
        "vhost-device-vsock.log",
    ];
    for e in fs::read_dir(run_dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(
            allowed.contains(&name.as_str()),
            "{name} left in the run dir"
        );
    }
}

#[test]
fn boots_and_powers_off() {
    let _slot = vm_slot();
    let image = test_init_image();
    let sel = detect::select(VmmChoice::Auto, Some(&image)).unwrap();
    eprintln!("engine: {} ({})", sel.engine, sel.explanation);
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs(dir.path(), "poweroff");
    let spec = spec(dir.path(), root.clone());
    assert_eq!(
        sel.vmm.link(&spec),
        GuestLink::HybridVsock {
            uds: spec.run_dir.join("vsock")
        }
    );
    let t0 = Instant::now();
    let mut vm = sel.vmm.launch(&spec).unwrap();
    let pids = vm.pids();
    assert_eq!(pids.len(), 3);
    let exit = wait_exit(vm.as_mut(), Duration::from_secs(120));
    eprintln!(
        "boot -> guest wrote its file -> power off: {:?}",
        t0.elapsed()
    );
    assert_eq!(
        fs::read_to_string(root.join("from-guest"))
            .unwrap_or_else(|e| panic!("{e}; console:\n{}", vm.console_tail(4000))),
        "guest says hi\n"
    );
    assert_eq!(
        exit,
        VmExit::Exited {
            component: "qemu".into(),
            status: Some(0),
            signal: None
        }
    );
    assert_nothing_left(&pids, &spec.run_dir);
}

#[test]
fn helper_death_stops_the_vm() {
    let image = test_init_image();
    // pids() order: vhost-device-vsock, virtiofsd, qemu.
    for (idx, component) in [(0, "vhost-device-vsock"), (1, "virtiofsd"), (2, "qemu")] {
        let _slot = vm_slot();
        let sel = detect::select(VmmChoice::Auto, Some(&image)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = rootfs(dir.path(), "stay");
        let spec = spec(dir.path(), root.clone());
        let mut vm = sel.vmm.launch(&spec).unwrap();
        let pids = vm.pids();
        let up = wait_for(
            vm.as_mut(),
            "the guest's ready file",
            Duration::from_secs(120),
            || root.join("ready").exists(),
        );
        eprintln!("guest up (virtio-fs mounted, file written) after {up:?}; killing {component}");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pids[idx]),
            nix::sys::signal::SIGKILL,
        )
        .unwrap();
        let exit = wait_exit(vm.as_mut(), Duration::from_secs(20));
        assert_eq!(
            exit,
            VmExit::Exited {
                component: component.into(),
                status: None,
                signal: Some(9)
            }
        );
        assert_nothing_left(&pids, &spec.run_dir);
    }
}

/// krun-oci-init: `$KRUN_OCI_INIT`, or built in this workspace's target dir.
fn real_init() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KRUN_OCI_INIT") {
        return Some(PathBuf::from(p));
    }
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target");
    [
        "x86_64-unknown-linux-musl/release",
        "x86_64-unknown-linux-musl/debug",
        "x86_64-unknown-linux-gnu/release",
        "x86_64-unknown-linux-gnu/debug",
        "release",
        "debug",
    ]
    .iter()
    .map(|d| target.join(d).join("krun-oci-init"))
    .find(|p| p.is_file() && kernel::elf_has_interpreter(p) == Some(false))
}

#[test]
fn real_init_link() {
    let Some(init) = real_init() else {
        let why = "no static krun-oci-init built (set KRUN_OCI_INIT, or `make init`)";
        assert!(
            std::env::var_os("KRUN_OCI_REQUIRE_VM").is_none(),
            "real_init_link: {why}"
        );
        eprintln!("SKIPPED real_init_link: {why}");
        return;
    };
    let _slot = vm_slot();
    // The kernel containers boot: ours when it is built (`make kernel`), as `auto`
    // picks it; the tests above cover the stock-kernel pipeline from scratch.
    let kernel = std::env::var_os("KRUN_OCI_KERNEL")
        .map(PathBuf::from)
        .or_else(|| image::own_kernel::cached(&image::cache::default_cache_dir()));
    let opts = ImageOptions {
        cache_dir: Some(cache_dir()),
        kernel,
        init: Some(init),
        extra_files: vec![],
        ..Default::default()
    };
    let mut image = image::ensure(&opts).unwrap();
    // KRUN_OCI_TEST_VERBOSE=1 shows the guest kernel's and init's log on the console.
    if std::env::var_os("KRUN_OCI_TEST_VERBOSE").is_some() {
        image.cmdline_extra = "loglevel=7".into();
    }
    let sel = detect::select(VmmChoice::Auto, Some(&image)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = rootfs(dir.path(), "");
    let spec = spec(dir.path(), root.clone());
    let link = sel.vmm.link(&spec);
    // Bound before launch: the guest dials it as its ready beacon.
    let events = UnixListener::bind(link.host_port_path(proto::HOST_EVENTS_PORT)).unwrap();
    events.set_nonblocking(true).unwrap();
    let t0 = Instant::now();
    let mut vm = sel.vmm.launch(&spec).unwrap();
    let pids = vm.pids();
    let mut ev = None;
    wait_for(
        vm.as_mut(),
        "the guest's beacon",
        Duration::from_secs(120),
        || match events.accept() {
            Ok((s, _)) => {
                ev = Some(s);
                true
            }
            Err(_) => false,
        },
    );
    let mut ev = ev.unwrap();
    ev.set_nonblocking(false).unwrap();
    ev.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    proto::handshake(&mut ev).unwrap();
    let ready = proto::recv(&mut ev).unwrap();
    eprintln!("boot-to-ready: {:?} ({ready:?})", t0.elapsed());
    assert!(matches!(ready, proto::Message::Ready { .. }), "{ready:?}");

    let mut ctl = link
        .connect(proto::CONTROL_PORT, Duration::from_secs(10))
        .unwrap();
    ctl.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    proto::handshake(&mut ctl).unwrap();
    proto::send(&mut ctl, proto::Message::Heartbeat).unwrap();
    assert_eq!(proto::recv(&mut ctl).unwrap(), proto::Message::HeartbeatAck);

    let process: proto::Process = serde_json::from_value(serde_json::json!({
        "cwd": "/", "args": ["/bin/sh", "-c", "echo hi > /f"], "env": ["PATH=/bin"],
        "user": {"uid": 0, "gid": 0}
    }))
    .unwrap();
    proto::send(
        &mut ctl,
        proto::Message::SpawnMain {
            process: Some(process),
        },
    )
    .unwrap();
    let started = proto::recv(&mut ctl).unwrap();
    assert!(
        matches!(started, proto::Message::MainStarted { .. }),
        "{started:?}"
    );
    let code = loop {
        match proto::read_frame(&mut ev).unwrap() {
            proto::Frame::Message(proto::Message::MainExited { code, .. }) => break code,
            _ => continue,
        }
    };
    assert_eq!(code, 0);
    assert_eq!(fs::read_to_string(root.join("f")).unwrap(), "hi\n");
    let exit = wait_exit(vm.as_mut(), Duration::from_secs(60));
    eprintln!("VM exit: {exit:?}");
    drop(events);
    let _ = fs::remove_file(link.host_port_path(proto::HOST_EVENTS_PORT));
    assert_nothing_left(&pids, &spec.run_dir);
}

#[test]
fn check_report_on_this_host() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vm_boot-init");
    let _ = test_init_image(); // writes the test init and fills the cache
    let opts = ImageOptions {
        cache_dir: Some(cache_dir()),
        kernel: std::env::var_os("KRUN_OCI_KERNEL").map(PathBuf::from),
        init: Some(dir.join("test-init.sh")),
        extra_files: vec![("bin/busybox".into(), BUSYBOX.into())],
        ..Default::default()
    };
    let r = krun_oci::check::report(VmmChoice::Auto, &opts);
    eprintln!("{r}");
    assert!(r.can_run(), "{r}");
    if Path::new("/sys/module/kvm_pvm").exists() {
        let s = r.to_string();
        assert!(s.contains("qemu + TCG") && s.contains("PVM"), "{s}");
    }
}
