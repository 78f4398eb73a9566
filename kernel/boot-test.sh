#!/usr/bin/env bash
# Boot a guest kernel under QEMU (TCG unless told otherwise) with a throwaway
# busybox initramfs, in both device models krun-oci uses:
#   acpi     -M microvm with ACPI: devices and the UART found through ACPI
#   mmio     -M microvm,acpi=off: QEMU appends virtio_mmio.device=... to the
#            command line (the libkrun model); CPUs from the MP table;
#            power-off via reboot=t + `reboot -f` + -no-reboot
# In each mode one boot runs the container-feature checks (cgroup2 with the
# cpu/memory/pids controllers, IPv6 loopback, overlayfs, POSIX mqueue, SMP,
# virtio device discovery), then N boots only print a marker and power off,
# to time the boot.
#
# Usage: kernel/boot-test.sh [-n BOOTS] [-a ACCEL] [VMLINUX]
#   VMLINUX defaults to the kernel kernel/build.sh built for the current key.
# Needs: qemu-system-x86_64, a static busybox (/usr/bin/busybox from
# busybox-static), cpio, gcc with static libc (for the mqueue probe).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
boots=5
accel=tcg
while getopts n:a: opt; do
	case $opt in
	n) boots=$OPTARG ;;
	a) accel=$OPTARG ;;
	*) echo "usage: $0 [-n BOOTS] [-a ACCEL] [VMLINUX]" >&2; exit 2 ;;
	esac
done
shift $((OPTIND - 1))
vmlinux=${1:-$("$here/build.sh" --path)}
[[ -f $vmlinux ]] || { echo "no kernel at $vmlinux: run kernel/build.sh" >&2; exit 1; }
busybox=${BUSYBOX:-/usr/bin/busybox}
file -L "$busybox" | grep -q 'statically linked' || {
	echo "$busybox is not a static busybox (apt-get install busybox-static)" >&2
	exit 1
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,tmp,sbin}
cp "$busybox" "$root/bin/busybox"

# POSIX message queue round trip (busybox has no mq tool).
cat >"$work/mqprobe.c" <<'EOF'
#include <fcntl.h>
#include <mqueue.h>
#include <stdio.h>
#include <string.h>
int main(void) {
	struct mq_attr attr = { .mq_maxmsg = 4, .mq_msgsize = 16 };
	char buf[16] = { 0 };
	mqd_t q = mq_open("/krun-oci-probe", O_CREAT | O_RDWR, 0600, &attr);
	if (q == (mqd_t)-1) { perror("mq_open"); return 1; }
	if (mq_send(q, "ping", 5, 0) != 0) { perror("mq_send"); return 1; }
	if (mq_receive(q, buf, sizeof buf, NULL) != 5 || strcmp(buf, "ping")) { perror("mq_receive"); return 1; }
	mq_unlink("/krun-oci-probe");
	return 0;
}
EOF
gcc -static -O2 -o "$root/bin/mqprobe" "$work/mqprobe.c"

cat >"$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "CHECK FAIL $*"; }
if grep -q krun_checks /proc/cmdline; then
	echo "CHECK cpus $(grep -c ^processor /proc/cpuinfo)"
	echo "CHECK virtio $(cat /sys/bus/virtio/devices/*/device 2>/dev/null | tr '\n' ' ')"
	mount -t tmpfs tmpfs /tmp
	if mount -t cgroup2 cgroup2 /sys/fs/cgroup; then
		c=$(cat /sys/fs/cgroup/cgroup.controllers)
		echo "CHECK cgroup2 controllers: $c"
		for want in cpu memory pids cpuset; do
			case " $c " in *" $want "*) ;; *) fail "cgroup2 lacks $want" ;; esac
		done
		mkdir /sys/fs/cgroup/probe && echo "+cpu +memory +pids" >/sys/fs/cgroup/cgroup.subtree_control &&
			echo 50000 100000 >/sys/fs/cgroup/probe/cpu.max && echo 64M >/sys/fs/cgroup/probe/memory.max &&
			echo 10 >/sys/fs/cgroup/probe/pids.max && echo "CHECK cgroup2 limits ok" || fail "cgroup2 limits"
	else
		fail "mount cgroup2"
	fi
	ip link set lo up
	if ip -6 addr show dev lo | grep -q '::1' && ping6 -c 1 -W 2 ::1 >/dev/null; then
		echo "CHECK ipv6 loopback ok"
	else
		fail "ipv6 loopback"; ip -6 addr
	fi
	mkdir -p /tmp/ov/lower /tmp/ov/upper /tmp/ov/work /tmp/ov/merged
	echo lower >/tmp/ov/lower/f
	if mount -t overlay overlay -o lowerdir=/tmp/ov/lower,upperdir=/tmp/ov/upper,workdir=/tmp/ov/work /tmp/ov/merged &&
		[ "$(cat /tmp/ov/merged/f)" = lower ] && echo new >/tmp/ov/merged/g && [ -f /tmp/ov/upper/g ]; then
		echo "CHECK overlay ok"
	else
		fail "overlay"
	fi
	mkdir -p /dev/mqueue
	if mount -t mqueue mqueue /dev/mqueue && /bin/mqprobe; then
		echo "CHECK mqueue ok"
	else
		fail "mqueue"
	fi
	if [ -e /proc/net/ip_tables_names ] && [ -e /proc/net/ip6_tables_names ]; then
		echo "CHECK netfilter iptables present"
	else
		fail "netfilter /proc/net/ip{,6}_tables_names"
	fi
	ip link add v0 type veth peer name v1 && ip link add br0 type bridge && ip link set v0 master br0 &&
		echo "CHECK veth+bridge ok" || fail "veth/bridge"
	ip link show eth0 >/dev/null 2>&1 && echo "CHECK virtio-net eth0 ok" || fail "virtio-net eth0"
fi
echo KRUN_OCI_BOOT_OK
if [ -d /sys/firmware/acpi/tables ]; then poweroff -f; else reboot -f; fi
EOF
chmod 755 "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet) >"$work/initramfs.cpio"

khz=$(awk '/^cpu MHz/ { printf "%d", $4 * 1000; exit }' /proc/cpuinfo)
base_cmdline="console=ttyS0 panic=-1 quiet tsc_early_khz=$khz cryptomgr.notests mitigations=off"

# run MODE EXTRA_CMDLINE [QEMU ARGS...]: prints "<ms to marker> <ms to exit>"
# and keeps the console in $work/console.
run() {
	local mode=$1 extra=$2 machine cmdline
	shift 2
	case $mode in
	acpi) machine=microvm,x-option-roms=off; cmdline="$base_cmdline $extra" ;;
	mmio) machine=microvm,x-option-roms=off,acpi=off; cmdline="$base_cmdline reboot=t $extra" ;;
	esac
	local start marker=-1 line now
	start=$(date +%s%N)
	while IFS= read -r line; do
		printf '%s\n' "$line" >>"$work/console"
		if [[ $line == *KRUN_OCI_BOOT_OK* ]]; then
			now=$(date +%s%N)
			marker=$(((now - start) / 1000000))
		fi
	done < <(timeout 120 qemu-system-x86_64 -M "$machine" -cpu qemu64 -accel "$accel" -smp 2 -m 256 \
		-nodefaults -no-user-config -nographic -no-reboot -serial stdio \
		-kernel "$vmlinux" -initrd "$work/initramfs.cpio" -append "$cmdline" "$@" 2>&1)
	now=$(date +%s%N)
	echo "$marker $(((now - start) / 1000000))"
}

median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : int((v[NR / 2] + v[NR / 2 + 1]) / 2) }'; }

status=0
echo "kernel: $vmlinux ($(stat -c %s "$vmlinux") bytes), accel $accel"
for mode in acpi mmio; do
	: >"$work/console"
	read -r marker _ < <(run "$mode" krun_checks \
		-device virtio-serial-device -chardev null,id=c0 -device virtconsole,chardev=c0 \
		-netdev user,id=n0 -device virtio-net-device,netdev=n0)
	grep 'CHECK' "$work/console" | tr -d '\r' | sed "s/^/[$mode] /"
	if ((marker < 0)) || grep -q 'CHECK FAIL' "$work/console"; then
		echo "[$mode] FAILED; console:"
		tr -d '\r' <"$work/console" | tail -40
		status=1
		continue
	fi
	grep -q "CHECK cpus 2" "$work/console" || { echo "[$mode] FAILED: expected 2 CPUs"; status=1; }
	# virtio ids: 3 console, 1 net
	grep -q "CHECK virtio .*0x0003" "$work/console" && grep -q "CHECK virtio .*0x0001" "$work/console" ||
		{ echo "[$mode] FAILED: virtio devices not found"; status=1; }
	: >"$work/times"
	for ((i = 0; i < boots; i++)); do
		: >"$work/console"
		read -r marker total < <(run "$mode" "")
		if ((marker < 0)); then
			echo "[$mode] boot $i FAILED; console:"; tr -d '\r' <"$work/console" | tail -20
			status=1
			continue
		fi
		echo "$marker $total" >>"$work/times"
	done
	if [[ -s $work/times ]]; then
		echo "[$mode] $(wc -l <"$work/times")/$boots boots ok; ms to marker: $(cut -d' ' -f1 "$work/times" | tr '\n' ' ')(median $(cut -d' ' -f1 "$work/times" | median)); ms to qemu exit: median $(cut -d' ' -f2 "$work/times" | median)"
	fi
done
exit $status
