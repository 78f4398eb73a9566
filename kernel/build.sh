#!/usr/bin/env bash
# Build krun-oci's own guest kernel from the distribution's kernel source
# package and the project's config fragment (kernel/krun-oci.config).
#
# Inputs:
#   - Debian package linux-source-6.12 (/usr/src/linux-source-6.12.tar.xz)
#   - kernel/krun-oci.config, applied on allnoconfig via KCONFIG_ALLCONFIG
# Build dependencies (Debian package names; `make deps` installs them):
#   linux-source-6.12 flex bison bc libelf-dev libssl-dev build-essential
#   (plus xz-utils and util-linux's flock, present on every Debian system)
#
# Output, in the guest-image cache:
#   <cache>/kernel/own/<source version>-<sha256(fragment)[0:16]>/vmlinux
#   ... and beside it .config (the final config), System.map and krun-oci.config.
# <cache> is $KRUN_OCI_CACHE, else /var/lib/krun-oci for root, else
# ${XDG_CACHE_HOME:-$HOME/.cache}/krun-oci. runtime/src/image/own_kernel.rs
# computes the same key and must stay in step with this script.
#
# The unpacked source (<cache>/kernel/src-<version>) and the object tree
# (<cache>/kernel/build-<version>) are kept, so a changed fragment rebuilds
# incrementally. An flock on <cache>/kernel/own/.lock serialises builds.
#
# Usage: kernel/build.sh            build (or reuse) and print the vmlinux path
#        kernel/build.sh --key      print the cache key only
#        kernel/build.sh --path     print where the vmlinux is/would be
set -euo pipefail

readonly SRC_PKG=linux-source-6.12
readonly TARBALL=/usr/src/${SRC_PKG}.tar.xz
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly FRAGMENT=$here/krun-oci.config

# Temp dirs of an unfinished unpack/install, removed if we stop early.
cleanup=()
trap 'rm -rf "${cleanup[@]}"' EXIT

die() { echo "kernel/build.sh: $*" >&2; exit 1; }
say() { echo "kernel/build.sh: $*" >&2; }

cache_dir() {
	if [[ -n ${KRUN_OCI_CACHE:-} ]]; then
		echo "$KRUN_OCI_CACHE"
	elif [[ $(id -u) -eq 0 ]]; then
		echo /var/lib/krun-oci
	else
		echo "${XDG_CACHE_HOME:-$HOME/.cache}/krun-oci"
	fi
}

# Version of the installed source package; empty when it is not installed
# (a removed package whose config files remain still has a version: check
# the status too).
source_version() {
	local status version
	IFS=$'\t' read -r status version < <(dpkg-query -W \
		-f='${db:Status-Status}\t${Version}\n' "$SRC_PKG" 2>/dev/null || true) || true
	[[ ${status:-} == installed ]] && echo "$version"
	return 0
}

# The version as it appears in paths: characters outside [A-Za-z0-9.+~-]
# (an epoch's ':', which make cannot handle in paths) become '_', exactly as
# own_kernel::key_for_version does.
path_version() {
	echo "${1//[^A-Za-z0-9.+~-]/_}"
}

fragment_hash() { sha256sum "$FRAGMENT" | cut -c1-16; }

# Every CONFIG_X=y of the fragment must be =y in the final config and every
# "# CONFIG_X is not set" must be unset: Kconfig silently drops options whose
# dependencies are not met, which would otherwise give a kernel that boots
# but lacks what containers need.
check_config() {
	local config=$1 bad=0 sym
	while read -r sym; do
		if ! grep -qx "${sym}=y" "$config"; then
			say "requested ${sym}=y but the final config has: $(grep -E "^${sym}=|^# ${sym} is not set" "$config" || echo 'nothing (symbol unknown?)')"
			bad=1
		fi
	done < <(sed -nE 's/^(CONFIG_[A-Za-z0-9_]+)=y$/\1/p' "$FRAGMENT")
	while read -r sym; do
		if grep -qE "^${sym}=" "$config"; then
			say "requested ${sym} off but the final config has: $(grep -E "^${sym}=" "$config")"
			bad=1
		fi
	done < <(sed -nE 's/^# (CONFIG_[A-Za-z0-9_]+) is not set$/\1/p' "$FRAGMENT")
	if grep -vE '^(#.*)?$' "$FRAGMENT" | grep -qvE '^CONFIG_[A-Za-z0-9_]+=y$'; then
		say "fragment lines other than CONFIG_X=y / '# CONFIG_X is not set':"
		grep -vE '^(#.*)?$' "$FRAGMENT" | grep -vE '^CONFIG_[A-Za-z0-9_]+=y$' >&2
		bad=1
	fi
	((bad == 0)) || die "config check failed: fix kernel/krun-oci.config"
}

main() {
	local mode=build
	case ${1:-} in
	"") ;;
	--key) mode=key ;;
	--path) mode=path ;;
	*) die "usage: $0 [--key|--path]" ;;
	esac

	local version hash key cache own out
	version=$(source_version)
	[[ -n $version ]] || die "package $SRC_PKG is not installed (apt-get install $SRC_PKG)"
	hash=$(fragment_hash)
	key=$(path_version "$version")-$hash
	cache=$(cache_dir)
	own=$cache/kernel/own
	out=$own/$key
	case $mode in
	key) echo "$key"; return ;;
	path) echo "$out/vmlinux"; return ;;
	esac

	if [[ -f $out/vmlinux ]]; then
		say "reused $out/vmlinux (source $version, fragment $hash)"
		echo "$out/vmlinux"
		return
	fi

	mkdir -p "$own"
	exec 9>"$own/.lock"
	if ! flock -n 9; then
		say "another kernel build holds $own/.lock; waiting"
		flock 9
	fi
	if [[ -f $out/vmlinux ]]; then
		say "reused $out/vmlinux (built concurrently by another process)"
		echo "$out/vmlinux"
		return
	fi

	[[ -f $TARBALL ]] || die "$TARBALL missing although $SRC_PKG is installed"
	local src=$cache/kernel/src-$(path_version "$version")
	local build=$cache/kernel/build-$(path_version "$version")
	if [[ ! -f $src/Makefile ]]; then
		say "unpacking $TARBALL into $src"
		local tmp_src
		tmp_src=$(mktemp -d "$src.tmp.XXXXXX")
		cleanup+=("$tmp_src")
		tar -xJf "$TARBALL" -C "$tmp_src" --strip-components=1
		chmod 755 "$tmp_src"
		rm -rf "$src"
		mv -T "$tmp_src" "$src"
	fi
	mkdir -p "$build"

	local -a kmake=(make -C "$src" O="$build" -s
		KBUILD_BUILD_USER=krun-oci KBUILD_BUILD_HOST=krun-oci)
	say "configuring: allnoconfig + $FRAGMENT"
	"${kmake[@]}" KCONFIG_ALLCONFIG="$FRAGMENT" allnoconfig
	"${kmake[@]}" olddefconfig
	check_config "$build/.config"

	local jobs
	jobs=$(nproc)
	say "building vmlinux in $build with -j$jobs (cold: ~4-5 min on 2 cores)"
	local start=$SECONDS
	"${kmake[@]}" -j"$jobs" vmlinux
	say "built in $((SECONDS - start)) s"

	# Both VMMs boot the ELF through its PVH entry note (owner "Xen").
	readelf -n "$build/vmlinux" | grep -q '^ *Xen ' ||
		die "$build/vmlinux has no PVH (Xen) ELF note: CONFIG_PVH missing?"

	local tmp_out
	tmp_out=$(mktemp -d "$own/.tmp-$key.XXXXXX")
	cleanup+=("$tmp_out")
	cp "$build/vmlinux" "$tmp_out/vmlinux"
	cp "$build/.config" "$tmp_out/.config"
	# No KALLSYMS in the guest: System.map decodes initcall_debug/oops addresses.
	cp "$build/System.map" "$tmp_out/System.map"
	cp "$FRAGMENT" "$tmp_out/krun-oci.config"
	chmod 755 "$tmp_out"
	rm -rf "$out"
	mv -T "$tmp_out" "$out"
	say "kernel ready: $out/vmlinux ($(stat -c %s "$out/vmlinux") bytes)"
	echo "$out/vmlinux"
}

main "$@"
