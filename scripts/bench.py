#!/usr/bin/env python3
"""krun-oci figures beside runc's: create, start, state, exec, boot-to-ready and host
memory per idle VM (our kernel and the distro's stock kernel), network throughput.
Prints; never asserts.

Usage: bench.py KRUN_OCI_BINARY [-n N] [--runc PATH] [--tb-sizes 0,32,...]

Method (also in docs/benchmarks.md):
- Bundles: busybox-static rootfs (applets symlinked to /bin/busybox), config.json from
  `krun-oci spec`, terminal false, root writable. One bundle per runtime.
- The main is `sh -c 'echo > /started; echo started; exec sleep 1000'`. Its FIRST action
  creates /started in the rootfs (virtio-fs for krun-oci: the file appears on the host
  when virtiofsd creates it). The host watches the rootfs with inotify from before
  `start` is invoked: "start -> main running" is the time from invoking `start` to the
  IN_CREATE event. The same clock also gives when `start` returned and when the main's
  "started" line reached create's stdout (a pipe the bench holds).
- create / state / exec: wall time of the CLI invocation (fork+exec to exit).
- boot-to-ready: the monitor's `boot-timing:` line in <root>/<id>/monitor.log: from
  launching the VMM (helpers included) to the guest's Ready message.
- Memory: ~IDLE_S after start (the main sleeping), sum of Pss (and Rss) from
  /proc/PID/smaps_rollup over the monitor and all its descendants (qemu, virtiofsd,
  vhost-device-vsock). With one VM up, every shared page counts fully for it; the
  density figure (--density K idle VMs up at once) splits shared pages between them.
"""

import argparse
import ctypes
import json
import os
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time

IDLE_S = 2.0
MAIN = ["sh", "-c", "echo > /started; echo started; exec sleep 1000"]
IN_CREATE = 0x100
IN_MOVED_TO = 0x80


def now():
    return time.monotonic()


class Inotify:
    """A minimal inotify watch on one directory (ctypes; no third-party module)."""

    def __init__(self, path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        wd = self.libc.inotify_add_watch(self.fd, path.encode(), IN_CREATE | IN_MOVED_TO)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")

    def wait_for(self, name, timeout):
        """Monotonic time at which `name` was created in the watched directory, or None."""
        deadline = now() + timeout
        while True:
            left = deadline - now()
            if left <= 0:
                return None
            r, _, _ = select.select([self.fd], [], [], left)
            if not r:
                continue
            t = now()
            buf = os.read(self.fd, 4096)
            off = 0
            while off + 16 <= len(buf):
                _wd, _mask, _cookie, ln = struct.unpack_from("iIII", buf, off)
                ev = buf[off + 16:off + 16 + ln].rstrip(b"\0").decode()
                off += 16 + ln
                if ev == name:
                    return t

    def close(self):
        os.close(self.fd)


def wait_exit(p, timeout):
    """Waits for `p` to exit, woken by its pidfd: Popen.wait(timeout) polls with sleeps
    that grow to 50 ms, which would round the figures up to its poll times."""
    fd = os.pidfd_open(p.pid)
    try:
        if not select.select([fd], [], [], timeout)[0]:
            p.kill()
            p.wait()
            raise subprocess.TimeoutExpired(p.args, timeout)
    finally:
        os.close(fd)
    return p.wait()


def run(cmd, env=None, check=True, **kw):
    t0 = now()
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=120, **kw)
    dt = now() - t0
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: rc {p.returncode}: {p.stderr.decode().strip()}")
    return dt, p


def make_bundle(krun, path):
    rootfs = os.path.join(path, "rootfs")
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev", "run"]:
        os.makedirs(os.path.join(rootfs, d), exist_ok=True)
    bb = os.path.join(rootfs, "bin", "busybox")
    shutil.copy2("/bin/busybox", bb)
    applets = subprocess.run([bb, "--list"], stdout=subprocess.PIPE, check=True).stdout.split()
    for a in applets:
        a = a.decode()
        if a != "busybox":
            os.symlink("busybox", os.path.join(rootfs, "bin", a))
    subprocess.run([krun, "spec", "--bundle", path], check=True)
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["process"]["terminal"] = False
    cfg["process"]["args"] = MAIN
    cfg["root"]["readonly"] = False
    json.dump(cfg, open(cfg_path, "w"), indent=2)
    return rootfs


class Runtime:
    def __init__(self, name, binary, root, bundle, env=None):
        self.name, self.binary, self.root, self.bundle = name, binary, root, bundle
        self.rootfs = os.path.join(bundle, "rootfs")
        self.env = env or dict(os.environ)

    def cli(self, *args):
        return [self.binary, "--root", self.root, *args]


def descendants(pid):
    """pid and all its descendants (from /proc/*/stat ppid)."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = open(f"/proc/{d}/stat").read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def memory_kb(pid, extra=()):
    """{comm: (pss_kb, rss_kb)} for pid and its descendants (and extra pids' trees: a
    pooled VM's member and helpers are not the monitor's children)."""
    res = {}
    pids = set(descendants(pid))
    for e in extra:
        pids.update(descendants(e))
    for p in sorted(pids):
        try:
            comm = open(f"/proc/{p}/comm").read().strip()
            pss = rss = 0
            for line in open(f"/proc/{p}/smaps_rollup"):
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
        except OSError:
            continue
        name = "monitor" if p == pid else ("pool-member" if comm == "krun-oci" else comm)
        a, b = res.get(name, (0, 0))
        res[name] = (a + pss, b + rss)
    return res


def boot_timing(root, cid):
    """(ready_ms, kernel, init steps) from the monitor's boot-timing line."""
    try:
        text = open(os.path.join(root, cid, "monitor.log")).read()
    except OSError:
        return None
    for line in text.splitlines():
        i = line.find("boot-timing:")
        if i < 0:
            continue
        msg = line[i:].rstrip('"')
        fields = dict(f.split("=", 1) for f in msg.split()[1:] if "=" in f)
        return {
            "ready_ms": float(fields.get("ready_ms", "nan")),
            "launch_ms": float(fields.get("launch_ms", "nan")),
            "kernel": fields.get("kernel", "?").strip('\\"'),
        }
    return None


def idle_density(rt, k):
    """PSS per VM with k idle containers up at once: pages shared between VMs (the
    QEMU binary and libraries, the kernel and initramfs files QEMU maps) count once
    in total, split between them, as on a host that runs many containers."""
    ids = [f"bench-dense-{i}" for i in range(k)]
    try:
        mons = []
        for cid in ids:
            pid_file = os.path.join(os.path.dirname(rt.root), f"{cid}.pid")
            # create's stdio become the container's: no pipe that would stay open.
            subprocess.run(rt.cli("create", "--bundle", rt.bundle, "--pid-file", pid_file, cid),
                           env=rt.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=120, check=True)
            run(rt.cli("start", cid), env=rt.env)
            mons.append(int(open(pid_file).read().strip()))
        time.sleep(IDLE_S)
        return sum(sum(v[0] for v in memory_kb(m).values()) for m in mons) / k
    finally:
        for cid in ids:
            run(rt.cli("delete", "--force", cid), env=rt.env, check=False)


def one_lifecycle(rt, cid, measure_vm=False, before_start=None):
    """create, [before_start()], start (timed against the main's first write), state,
    exec true, [memory], delete. Returns a dict of figures in seconds / kB."""
    r = {}
    started = os.path.join(rt.rootfs, "started")
    if os.path.exists(started):
        os.unlink(started)
    pid_file = os.path.join(os.path.dirname(rt.root), f"{cid}.pid")
    # create's stdout is the container's: a pipe we keep reading. Its stderr goes to a
    # file: the container keeps it open, so a pipe would never reach EOF.
    rfd, wfd = os.pipe()
    err_path = os.path.join(os.path.dirname(rt.root), f"{cid}.stderr")
    with open(err_path, "wb") as err:
        t0 = now()
        p = subprocess.Popen(
            rt.cli("create", "--bundle", rt.bundle, "--pid-file", pid_file, cid),
            stdin=subprocess.DEVNULL, stdout=wfd, stderr=err, env=rt.env)
        os.close(wfd)
        wait_exit(p, 120)
        r["create"] = now() - t0
    if p.returncode != 0:
        os.close(rfd)
        run(rt.cli("delete", "--force", cid), env=rt.env, check=False)
        raise RuntimeError(f"{rt.name} create: rc {p.returncode}: {open(err_path).read().strip()}")
    try:
        if measure_vm:
            bt = boot_timing(rt.root, cid)
            if bt:
                r["ready"] = bt["ready_ms"] / 1000
                r["kernel"] = bt["kernel"]
        if before_start:
            before_start()
        watch = Inotify(rt.rootfs)
        t0 = now()
        dt, _ = run(rt.cli("start", cid), env=rt.env)
        r["start_returned"] = dt
        seen = watch.wait_for("started", 30)
        watch.close()
        r["start_main"] = (seen - t0) if seen else float("nan")
        ready, _, _ = select.select([rfd], [], [], 30)
        r["start_stdout"] = (now() - t0) if ready else float("nan")
        r["state"], _ = run(rt.cli("state", cid), env=rt.env)
        r["exec"], _ = run(rt.cli("exec", cid, "true"), env=rt.env)
        if measure_vm:
            time.sleep(IDLE_S)
            mon = int(open(pid_file).read().strip())
            st = json.load(open(os.path.join(rt.root, cid, "state.json")))
            mem = memory_kb(mon, st.get("helper_pids", []))
            r["pss_kb"] = sum(v[0] for v in mem.values())
            r["rss_kb"] = sum(v[1] for v in mem.values())
            r["pss_by_process"] = {k: v[0] for k, v in mem.items()}
    finally:
        os.close(rfd)
        run(rt.cli("delete", "--force", cid), env=rt.env, check=False)
        if os.path.exists(pid_file):
            os.unlink(pid_file)
    return r


class PoolDaemon:
    """`krun-oci pool serve` on a root, for the pool figures."""

    def __init__(self, krun, root, idle, env):
        self.krun, self.root, self.idle, self.env = krun, root, idle, env
        os.makedirs(root, exist_ok=True)
        self.proc = subprocess.Popen(
            [krun, "--root", root, "--log", root + ".pool.log", "pool", "serve",
             "--min-idle", str(idle), "--max-idle", str(idle)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=env)

    def status(self):
        p = subprocess.run([self.krun, "--root", self.root, "pool", "status", "--format", "json"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=self.env)
        return json.loads(p.stdout) if p.returncode == 0 else None

    def wait_full(self, timeout=120):
        t0 = now()
        while now() - t0 < timeout:
            s = self.status()
            if s and s["idle"] >= self.idle:
                return True
            time.sleep(0.05)
        return False

    def idle_pss_kb(self):
        """PSS of each idle member's process tree (member, QEMU and helpers)."""
        s = self.status() or {"members": []}
        return [sum(v[0] for v in memory_kb(m["pid"]).values())
                for m in s["members"] if m["state"] == "idle"]

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


def pool_figures(krun, kr, runs, burst, podman_runs):
    """create on a pool hit, start/exec on a pooled VM, creates arriving faster than the
    pool refills, memory per idle pooled VM, and podman run end to end."""
    env = dict(os.environ, KRUN_OCI_KERNEL_SOURCE="own")
    out = {"hit": [], "hit_refilled": [], "burst": [], "burst_hits": 0, "idle_pss": [],
           "podman": {}}
    pool = PoolDaemon(krun, kr.root, 2, env)
    try:
        if not pool.wait_full():
            raise RuntimeError("the pool did not fill")
        time.sleep(IDLE_S)
        out["idle_pss"] = pool.idle_pss_kb()
        rt = Runtime("krun-oci (pool hit)", krun, kr.root, kr.bundle, env)
        for i in range(runs):
            pool.wait_full()
            out["hit"].append(one_lifecycle(rt, f"bench-pool-{i}", measure_vm=True))
        # The same, with start and exec after the pool's refill boot is done: on 2 cores
        # that boot (SCHED_IDLE, but a TCG vCPU) competes with the claimed VM.
        for i in range(runs):
            pool.wait_full()
            out["hit_refilled"].append(one_lifecycle(
                rt, f"bench-pool-r{i}", before_start=pool.wait_full))
        pool.wait_full()
        hits0 = pool.status()["hits"]
        for i in range(burst):
            cid = f"bench-burst-{i}"
            t0 = now()
            p = subprocess.Popen(rt.cli("create", "--bundle", rt.bundle, cid), env=env,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
            if wait_exit(p, 120) != 0:
                raise RuntimeError(f"burst create {cid}: rc {p.returncode}")
            out["burst"].append(now() - t0)
            run(rt.cli("delete", "--force", cid), env=env, check=False)
        out["burst_hits"] = pool.status()["hits"] - hits0
        if podman_runs > 0 and shutil.which("podman"):
            out["podman"] = podman_figures(krun, kr, pool, podman_runs, env)
    finally:
        pool.close()
    return out


def podman_figures(krun, kr, pool, runs, env):
    """`podman run --rm ... true`, end to end: runc, krun-oci with the pool, krun-oci cold."""
    work = os.path.dirname(kr.root)
    wrappers = {}
    for name, line in [
        ("runc", f"exec /usr/sbin/runc \"$@\""),
        ("krun-oci (pool)", f"KRUN_OCI_INIT={os.environ.get('KRUN_OCI_INIT', '')} "
                            f"exec {krun} --root {kr.root} \"$@\""),
        ("krun-oci (cold)", f"KRUN_OCI_INIT={os.environ.get('KRUN_OCI_INIT', '')} "
                            f"exec {krun} --root {kr.root}-cold \"$@\""),
    ]:
        d = os.path.join(work, "podman-bin", name.replace(" ", "_").replace("(", "").replace(")", ""))
        os.makedirs(d, exist_ok=True)
        # podman goes by the runtime's basename: krun-oci's wrapper is named krun-oci.
        w = os.path.join(d, "runc" if name == "runc" else "krun-oci")
        with open(w, "w") as f:
            f.write(f"#!/bin/sh\n{line}\n")
        os.chmod(w, 0o755)
        wrappers[name] = w
    base = ["podman", "--root", os.path.join(work, "podman-root"), "--runroot",
            os.path.join(work, "podman-run"), "--cgroup-manager", "cgroupfs",
            "--events-backend", "file"]
    res = {}
    for name, w in wrappers.items():
        times = []
        for _ in range(runs):
            if name == "krun-oci (pool)":
                pool.wait_full()
            t0 = now()
            p = subprocess.run(base + ["run", "--rm", "--runtime", w, "--network", "none",
                                       "--ulimit", "nofile=1024:1024", "--ulimit",
                                       "nproc=1024:1024", "--rootfs", kr.rootfs, "true"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env=env, timeout=180)
            if p.returncode != 0:
                raise RuntimeError(f"podman run with {name}: {p.stderr.decode().strip()}")
            times.append(now() - t0)
        res[name] = times
    return res


NET_SCRIPT = (
    "dd if=/dev/zero of=/blob/blob bs=1M count={mib} 2>/dev/null; "
    "httpd -p 80 -h /blob; echo serving; "
    "while [ ! -e /go ]; do sleep 0.05; done; echo fetching; "
    "wget -q -O /dev/null http://10.77.0.1:8000/blob; echo fetched rc=$?"
)


def ip(*args):
    subprocess.run(["ip", *args], check=True, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


class BenchNet:
    """Two network namespaces joined by a veth, as in runtime/tests/network.rs: the
    container side (eth0, 10.77.0.2/24) and the far side (10.77.0.1) with a busybox
    httpd serving a file of `mib` MiB (sparse: its pages cost nothing to read)."""

    def __init__(self, work, mib):
        self.ctr, self.far = f"krb-{os.getpid()}-c", f"krb-{os.getpid()}-f"
        ip("netns", "add", self.ctr)
        ip("netns", "add", self.far)
        ip("-n", self.far, "link", "add", "kv-far", "type", "veth", "peer", "name", "eth0",
           "netns", self.ctr)
        ip("-n", self.far, "addr", "add", "10.77.0.1/24", "dev", "kv-far")
        ip("-n", self.far, "link", "set", "kv-far", "up")
        ip("-n", self.ctr, "addr", "add", "10.77.0.2/24", "dev", "eth0")
        ip("-n", self.ctr, "link", "set", "eth0", "up")
        www = os.path.join(work, "www-far")
        os.makedirs(www, exist_ok=True)
        with open(os.path.join(www, "blob"), "wb") as f:
            f.truncate(mib << 20)
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", self.far, "/bin/busybox", "httpd", "-f", "-p", "8000",
             "-h", www], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        time.sleep(0.3)

    def close(self):
        self.server.kill()
        self.server.wait()
        subprocess.run(["ip", "netns", "del", self.ctr], stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "netns", "del", self.far], stderr=subprocess.DEVNULL)


def network_throughput(rt, net, mib):
    """(guest -> far, far -> guest) in Gbit/s for `mib` MiB over HTTP. Guest -> far:
    the far side fetches from busybox httpd in the container (file in a tmpfs),
    timed on the host. Far -> guest: the container fetches from the far server,
    timed by the host from the container's 'fetching' line to its 'fetched' line."""
    cfg_path = os.path.join(rt.bundle, "config.json")
    original = open(cfg_path).read()
    cfg = json.loads(original)
    cfg["process"]["args"] = ["sh", "-c", NET_SCRIPT.format(mib=mib)]
    for ns in cfg["linux"]["namespaces"]:
        if ns["type"] == "network":
            ns["path"] = f"/run/netns/{net.ctr}"
    cfg["mounts"].append({"destination": "/blob", "type": "tmpfs", "source": "tmpfs",
                          "options": ["nosuid", "nodev", f"size={mib + 16}m"]})
    cfg.setdefault("annotations", {})["krun-oci.ram_mib"] = str(mib + 512)
    json.dump(cfg, open(cfg_path, "w"))
    go = os.path.join(rt.rootfs, "go")
    if os.path.exists(go):
        os.unlink(go)
    cid = f"bench-net-{rt.name.split()[0]}"
    proc = subprocess.Popen(rt.cli("run", "--bundle", rt.bundle, cid), env=rt.env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        def line(want):
            while True:
                ready, _, _ = select.select([proc.stdout], [], [], 300)
                if not ready:
                    raise RuntimeError(f"{rt.name}: no '{want}' line")
                got = proc.stdout.readline().decode()
                if not got:
                    raise RuntimeError(f"{rt.name}: exited before '{want}'")
                if got.startswith(want):
                    return now(), got
        line("serving")
        dt, _ = run(["ip", "netns", "exec", net.far, "/bin/busybox", "wget", "-q", "-O",
                     "/dev/null", "http://10.77.0.2/blob"])
        out_gbit = mib * 8 * 1.048576 / 1000 / dt
        open(go, "w").close()
        t0, _ = line("fetching")
        t1, got = line("fetched")
        if "rc=0" not in got:
            raise RuntimeError(f"{rt.name}: guest fetch failed: {got.strip()}")
        in_gbit = mib * 8 * 1.048576 / 1000 / (t1 - t0)
        proc.wait(timeout=60)
        return out_gbit, in_gbit
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        run(rt.cli("delete", "--force", cid), env=rt.env, check=False)
        open(cfg_path, "w").write(original)
        if os.path.exists(go):
            os.unlink(go)


def stats(values):
    v = [x for x in values if x == x]  # drop NaN
    if not v:
        return None
    return statistics.median(v), min(v), max(v), len(v)


def fmt_s(values):
    s = stats(values)
    if not s:
        return "n/a"
    med, lo, hi, n = s
    return f"{med * 1000:8.1f} ms  (min {lo * 1000:.1f}, max {hi * 1000:.1f}, n={n})"


def fmt_mb(values):
    s = stats(values)
    if not s:
        return "n/a"
    med, lo, hi, n = s
    return f"{med / 1024:7.1f} MB  (min {lo / 1024:.1f}, max {hi / 1024:.1f}, n={n})"


def qemu_wrapper(work, tb_size):
    """A qemu stand-in that adds tb-size=N to `-accel tcg[,...]` (exec keeps the pid)."""
    real = shutil.which("qemu-system-x86_64")
    path = os.path.join(work, f"qemu-tb{tb_size}")
    with open(path, "w") as f:
        f.write(f"""#!/bin/bash
args=()
for a in "$@"; do case "$a" in tcg|tcg,*) a="$a,tb-size={tb_size}";; esac; args+=("$a"); done
exec {real} "${{args[@]}}"
""")
    os.chmod(path, 0o755)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("krun_oci")
    ap.add_argument("-n", type=int, default=int(os.environ.get("BENCH_N", "7")))
    ap.add_argument("--runc", default="/usr/sbin/runc")
    ap.add_argument("--tb-sizes", default=os.environ.get("BENCH_TB_SIZES", ""),
                    help="comma-separated TCG tb-size values (MiB) to try, e.g. 16,32,64")
    ap.add_argument("--skip-distro", action="store_true")
    ap.add_argument("--density", type=int, default=int(os.environ.get("BENCH_DENSITY", "4")),
                    help="idle VMs up at once for the per-VM PSS under sharing (0: skip)")
    ap.add_argument("--net-mib", type=int, default=int(os.environ.get("BENCH_NET_MIB", "256")),
                    help="MiB sent over HTTP each way between the container and the far "
                         "side of a veth (0: skip)")
    ap.add_argument("--net-runs", type=int, default=int(os.environ.get("BENCH_NET_RUNS", "3")))
    ap.add_argument("--pool-runs", type=int, default=int(os.environ.get("BENCH_POOL_RUNS", "7")),
                    help="lifecycles on a pool hit (0: skip the pool figures)")
    ap.add_argument("--pool-burst", type=int, default=20,
                    help="creates sent back to back against a pool of 2")
    ap.add_argument("--podman-runs", type=int, default=5,
                    help="podman run --rm ... true per runtime (0: skip)")
    a = ap.parse_args()
    # SIGTERM/SIGHUP (e.g. make interrupted) still run the cleanup below.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, _f: sys.exit(128 + s))
    krun = os.path.abspath(a.krun_oci)
    work = tempfile.mkdtemp(prefix="krun-oci-bench.")
    rts = []
    try:
        for name, binary in [("runc", a.runc), ("krun-oci", krun)]:
            bundle = os.path.join(work, f"bundle-{name}")
            os.makedirs(bundle)
            make_bundle(krun, bundle)
            rts.append(Runtime(name, binary, os.path.join(work, f"state-{name}"), bundle))
        runc, kr = rts
        variants = [("krun-oci (own kernel)", "own", None)]
        if not a.skip_distro:
            variants.append(("krun-oci (distro kernel)", "distro", None))
        for tb in [t for t in a.tb_sizes.split(",") if t.strip()]:
            variants.append((f"krun-oci (own kernel, tb-size={tb})", "own", int(tb)))

        print(f"# krun-oci bench: N={a.n}, {time.strftime('%Y-%m-%d %H:%M:%S %z')}, "
              f"host {os.uname().release}, {os.cpu_count()} CPUs", flush=True)
        results = {"runc": []}
        for label, _, _ in variants:
            results[label] = []
        for i in range(a.n):
            results["runc"].append(one_lifecycle(runc, f"bench-runc-{i}"))
            for label, source, tb in variants:
                env = dict(os.environ, KRUN_OCI_KERNEL_SOURCE=source)
                if tb is not None:
                    env["KRUN_OCI_QEMU"] = qemu_wrapper(work, tb)
                rt = Runtime(label, krun, kr.root, kr.bundle, env)
                results[label].append(one_lifecycle(rt, f"bench-krun-{i}", measure_vm=True))
            print(f"  run {i + 1}/{a.n} done", file=sys.stderr, flush=True)

        density = {}
        if a.density > 0:
            for label, source, tb in variants:
                if tb is not None:
                    continue
                env = dict(os.environ, KRUN_OCI_KERNEL_SOURCE=source)
                rt = Runtime(label, krun, kr.root, kr.bundle, env)
                density[label] = [idle_density(rt, a.density) for _ in range(3)]
            print("  density runs done", file=sys.stderr, flush=True)

        throughput = {}
        if a.net_mib > 0:
            net = BenchNet(work, a.net_mib)
            try:
                for _ in range(a.net_runs):
                    for rt in (runc, Runtime("krun-oci (own kernel)", krun, kr.root, kr.bundle,
                                             dict(os.environ, KRUN_OCI_KERNEL_SOURCE="own"))):
                        throughput.setdefault(rt.name, []).append(
                            network_throughput(rt, net, a.net_mib))
            finally:
                net.close()
            print("  network runs done", file=sys.stderr, flush=True)

        pool = None
        if a.pool_runs > 0:
            pool = pool_figures(krun, kr, a.pool_runs, a.pool_burst, a.podman_runs)
            results["krun-oci (pool hit)"] = pool["hit"]
            results["krun-oci (pool hit, refill done)"] = pool["hit_refilled"]
            print("  pool runs done", file=sys.stderr, flush=True)

        def col(label, key):
            return [r.get(key, float("nan")) for r in results[label]]

        sections = [
            ("create (cold VM boot to `created`; the pool row: a pooled VM claimed)",
             "create", fmt_s),
            ("start: invoke `start` -> main's first write seen (inotify)", "start_main", fmt_s),
            ("start: invoke `start` -> `start` returned", "start_returned", fmt_s),
            ("start: invoke `start` -> main's first stdout line on create's stdout",
             "start_stdout", fmt_s),
            ("state", "state", fmt_s),
            ("exec ID true", "exec", fmt_s),
            ("boot-to-ready (VMM launch -> guest Ready, monitor.log)", "ready", fmt_s),
            ("host memory per idle VM, PSS (monitor+qemu+virtiofsd+vhost-device-vsock)",
             "pss_kb", fmt_mb),
            ("host memory per idle VM, RSS (same processes)", "rss_kb", fmt_mb),
        ]
        for title, key, f in sections:
            print(f"\n## {title}")
            for label in results:
                if key in ("ready", "pss_kb", "rss_kb") and label in (
                        "runc", "krun-oci (pool hit, refill done)"):
                    continue
                print(f"  {label:40s} {f(col(label, key))}")
        if pool:
            b = sorted(pool["burst"])
            pct = lambda q: b[min(len(b) - 1, int(round(q * (len(b) - 1))))]
            print(f"\n## create, {len(b)} creates back to back against a pool of 2 "
                  f"({pool['burst_hits']} hits)")
            print(f"  {'krun-oci (pool)':40s} p50 {pct(0.5) * 1000:.0f} ms, p95 "
                  f"{pct(0.95) * 1000:.0f} ms (min {b[0] * 1000:.0f}, max {b[-1] * 1000:.0f})")
            print("\n## host memory per idle pooled VM, PSS (member+qemu+virtiofsd x2+vhost-device-vsock)")
            print(f"  {'krun-oci (pool, idle)':40s} {fmt_mb(pool['idle_pss'])}")
            if pool["podman"]:
                print("\n## podman run --rm --network none --rootfs R true, end to end")
                for label, v in pool["podman"].items():
                    print(f"  {label:40s} {fmt_s(v)}")
        if density:
            print(f"\n## host memory per idle VM, PSS, {a.density} idle VMs up at once "
                  "(shared pages split between them; 3 runs)")
            for label, v in density.items():
                print(f"  {label:40s} {fmt_mb(v)}")
        if throughput:
            for i, way in enumerate(["container -> far side", "far side -> container"]):
                print(f"\n## network: {a.net_mib} MiB over HTTP, {way} of a veth "
                      f"(Gbit/s, {a.net_runs} runs)")
                for label, v in throughput.items():
                    g = [x[i] for x in v]
                    print(f"  {label:40s} median {statistics.median(g):.2f} "
                          f"(min {min(g):.2f}, max {max(g):.2f})")
        print("\n## PSS by process (median, MB)")
        for label in results:
            if label in ("runc", "krun-oci (pool hit, refill done)"):
                continue
            per = {}
            for r in results[label]:
                for k, v in r.get("pss_by_process", {}).items():
                    per.setdefault(k, []).append(v)
            parts = [f"{k} {statistics.median(v) / 1024:.1f}" for k, v in sorted(per.items())]
            kernels = sorted({r.get("kernel", "?") for r in results[label]})
            print(f"  {label:40s} {', '.join(parts)}  [kernel: {', '.join(kernels)}]")
    finally:
        for rt in rts:
            if os.path.isdir(rt.root):
                for cid in os.listdir(rt.root):
                    subprocess.run(rt.cli("delete", "--force", cid),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)
        left = subprocess.run(["pgrep", "-a", "-f", work], stdout=subprocess.PIPE).stdout.decode()
        print("\n## cleanup: " + ("nothing left" if not left.strip() else f"LEFT OVER:\n{left}"))


if __name__ == "__main__":
    main()
