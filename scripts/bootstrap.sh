#!/usr/bin/env bash
# Ferry set-up for Debian 12 (run as root). Idempotent: a second run only checks and prints.
#   - Debian packages Ferry uses (iproute2, rsync, util-linux, nftables, CRIU build deps)
#   - CRIU >= 4.2, built from Debian unstable's source package with Ferry's patches
#     (patches/criu) into $FERRY_CACHE (default /var/cache/ferry), once per set of patches
#   - the pipe sysctls CRIU's lazy pages need where root lacks CAP_SYS_RESOURCE
#   - npm ci and the build (skip with --no-node)
#   - with --bench: Podman and runc, which the benchmark compares against
set -euo pipefail

say() { printf 'ferry-setup: %s\n' "$*"; }
die() { printf 'ferry-setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (CRIU and namespaces need it); re-run with sudo"

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${FERRY_CACHE:-/var/cache/ferry}
confdir=${FERRY_CONFIG_DIR:-/etc/ferry}
want_node=1
want_bench=0
for a in "$@"; do
  case "$a" in
    --no-node) want_node=0 ;;
    --bench) want_bench=1 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) die "unknown option '$a' (known: --no-node, --bench, --help)" ;;
  esac
done

export DEBIAN_FRONTEND=noninteractive

# ---- Debian packages -------------------------------------------------------------------------
# python3 and redis-server: tests run a task on a pseudo-terminal (pty module) and a real redis;
# chromium: the dashboard test drives it headless (playwright-core, no browser download);
# etcd-server: the test of two controllers electing a leader runs its own etcd on loopback.
# strace: a test holds the lazy-pages daemon in one system call (its delay injection).
runtime_pkgs=(iproute2 rsync util-linux nftables iptables procps kmod openssl ca-certificates gcc make libc6-dev netcat-openbsd python3 redis-server chromium etcd-server strace)
build_pkgs=(build-essential libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler
  python3-protobuf libnl-3-dev libnet1-dev libcap-dev pkg-config libbsd-dev libaio-dev
  libgnutls28-dev libnftables-dev uuid-dev libdrm-dev dpkg-dev xz-utils patch)

missing_pkgs() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || printf '%s\n' "$p"
  done
}

apt_updated=0
apt_install() {
  local miss
  mapfile -t miss < <(missing_pkgs "$@")
  if [ ${#miss[@]} -eq 0 ]; then return 0; fi
  if [ $apt_updated = 0 ]; then
    say "apt-get update"
    apt-get update -qq
    apt_updated=1
  fi
  say "installing Debian packages: ${miss[*]}"
  apt-get install -y -qq --no-install-recommends "${miss[@]}" >/dev/null
}

apt_install "${runtime_pkgs[@]}"
say "runtime packages present: ${runtime_pkgs[*]}"
if [ $want_bench = 1 ]; then
  # The benchmark compares Ferry with Podman's checkpoint export/import (runc drives CRIU).
  apt_install podman runc
  say "benchmark packages present: podman runc"
fi

# ---- CRIU ------------------------------------------------------------------------------------
version_ge_42() { # "4.2.1" -> true when >= 4.2
  local v=$1 major minor
  major=${v%%.*}; minor=${v#*.}; minor=${minor%%.*}
  [ "$major" -gt 4 ] || { [ "$major" -eq 4 ] && [ "$minor" -ge 2 ]; }
}
criu_version() { "$1" --version 2>/dev/null | sed -n 's/^Version: *\([0-9][0-9.]*\).*/\1/p' | head -n1; }
criu_good() { # path -> 0 when version >= 4.2 and criu check passes
  local bin=$1 v
  [ -x "$bin" ] || return 1
  v=$(criu_version "$bin"); [ -n "$v" ] || return 1
  version_ge_42 "$v" || return 1
  "$bin" check >/dev/null 2>&1
}

# Ferry's patches to CRIU (patches/criu: the lazy-pages daemon's speed) name the build, so a
# change to them builds CRIU again; a criu on PATH lacks them and is not used.
patchid=$(cat "$repo"/patches/criu/*.patch | sha256sum | cut -c1-12)
criu_bin=""
for cand in "$cache"/criu-*-ferry-"$patchid"/criu; do
  # ferry-patches says which patches went in (ferry doctor reads it); a build without it is older.
  if [ -x "$cand" ] && [ -f "$(dirname "$cand")/ferry-patches" ] && criu_good "$cand"; then criu_bin=$cand; fi
done
# CRIU's source from Debian unstable (sets srcver, upver, work, srcdir).
fetch_criu_source() {
  srclist=/etc/apt/sources.list.d/ferry-criu-src.sources
  if [ ! -f "$srclist" ]; then
    # The same mirror this machine already uses for bookworm.
    mirror=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v -- '-security' | head -n1)
    [ -n "$mirror" ] || mirror=$(grep -hs '^deb ' /etc/apt/sources.list | awk '$3 ~ /^bookworm$/ {print $2}' | head -n1)
    [ -n "$mirror" ] || die "cannot find this machine's Debian mirror in /etc/apt to add the unstable source index"
    # deb-src only: a deb entry for sid would mix releases on this machine.
    cat >"$srclist" <<SRC
Types: deb-src
URIs: $mirror
Suites: unstable
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    say "added deb-src entry for Debian unstable: $srclist"
  fi
  say "apt-get update (with the unstable source index)"
  apt-get -o Acquire::Check-Valid-Until=false update -qq
  srcver=$(apt-cache showsrc criu 2>/dev/null | sed -n 's/^Version: //p' | sort -V | tail -n1)
  [ -n "$srcver" ] || die "no CRIU source package found in Debian unstable; check network access to Debian's mirror"
  upver=${srcver%%-*}; upver=${upver#*:}
  version_ge_42 "$upver" || die "Debian unstable offers CRIU $upver, older than 4.2"
  work=$(mktemp -d /tmp/ferry-criu-build.XXXXXX)
  trap 'rm -rf "$work"' EXIT
  say "fetching CRIU $srcver source"
  # The .debian.tar.xz may be missing on the mirror snapshot; the orig tarball is what we build.
  (cd "$work" && apt-get -o Acquire::Check-Valid-Until=false source --download-only "criu=$srcver" >/dev/null 2>&1) || true
  tarball=$(ls "$work"/criu_"$upver".orig.tar.* 2>/dev/null | head -n1)
  [ -n "$tarball" ] || die "could not download criu_${upver}.orig tarball; check the deb-src entry in $srclist"
  tar -C "$work" -xf "$tarball"
  srcdir=$(find "$work" -maxdepth 1 -mindepth 1 -type d -name 'criu*' | head -n1)
}

if [ -n "$criu_bin" ]; then
  say "using cached criu: $criu_bin ($(criu_version "$criu_bin"), Ferry's patches $patchid)"
else
  say "building CRIU >= 4.2 from Debian unstable's source package, with Ferry's patches ($patchid)"
  apt_install "${build_pkgs[@]}"
  fetch_criu_source
  # A patch that does not apply to a newer CRIU is left out (doctor says what that costs: speed,
  # or for 0012/0013 tasks that changed their user, and a quick failure on a lock held elsewhere).
  : >"$work/ferry-patches"
  for p in "$repo"/patches/criu/*.patch; do
    if patch -d "$srcdir" -p1 --quiet --dry-run <"$p" >/dev/null 2>&1; then
      patch -d "$srcdir" -p1 --quiet <"$p"
      echo "applied $(basename "$p" .patch)" >>"$work/ferry-patches"
    else
      say "warning: Ferry's CRIU patch $(basename "$p") does not apply to CRIU $upver; building without it"
      echo "not-applied $(basename "$p" .patch)" >>"$work/ferry-patches"
    fi
  done
  say "building CRIU $upver (make -j$(nproc) criu)"
  make -C "$srcdir" -j"$(nproc)" criu >"$work/build.log" 2>&1 || { tail -n 30 "$work/build.log" >&2; die "CRIU build failed (log above)"; }
  mkdir -p "$cache/criu-$upver-ferry-$patchid"
  install -m 0755 "$srcdir/criu/criu" "$cache/criu-$upver-ferry-$patchid/criu"
  install -m 0644 "$work/ferry-patches" "$cache/criu-$upver-ferry-$patchid/ferry-patches"
  criu_bin="$cache/criu-$upver-ferry-$patchid/criu"
  criu_good "$criu_bin" || die "built $criu_bin but 'criu check' fails: run '$criu_bin check' to see why"
  say "built and installed $criu_bin"
fi
# CRIU's own tests of one kernel object each (test/zdtm/static: a file, socket, timer, mapping,
# ...): test/support/zdtm.ts runs them as Ferry tasks and migrates them. Built once; a
# failed build is reported and leaves the suite to say what it cannot check.
zdtm_tests=(
  env00 umask00 pthread00 zombie00 session00 sigpending sigaltstack futex posix_timers
  pthread_timers timerfd signalfd00 eventfs00 epoll inotify00 fanotify00 unlink_fstat00
  unlink_mmap00 write_read01 file_append fd_offset pipe00 pipe02 sockets00 sockets_dgram
  socket_listen socket_udp sk-unix-unconn socket_queues sk-netlink packet_sock sock_opts00
  deleted_unix_sock maps00 maps04 mprotect00 shm memfd00 shmemfd msgque sem vdso00 selfexe00
  thp_disable
  # Mappings and memory, which pre-copy's tracking must not miss a write of:
  maps01 maps02 maps03 maps05 maps06 maps11 maps12 maps_file_prot mem-touch grow_map grow_map02
  grow_map03 shm-unaligned shmemfd-priv memfd03 mtime_mmap unlink_mmap01 unlink_mmap02 pthread01
  fpu00 memfd01
  # One kernel object each, moved by stop-copy and auto (OBJECT_TESTS in test/support/zdtm.ts):
  pty00 pty02 pty04 tty00 tty03 fifo-ghost fifo-rowo-pair unlink_fifo scm00 scm03 scm05
  sockets01 sockets_spair sockets03 sk-unix-rel del_standalone_un sk-unix-dgram-ghost
  sk-unix-listen01 socket_listen6 socket_udp_shutdown socket-tcp-listen socket-tcp sock_filter00
  sock_tcp_opts00 pidfd_child pidfd_kill fd_from_pidfd ghost_holes00 unlink_fstat02 rmdir_open
  opath_file cwd01 write_read10 file_fown fdt_shared file_shared aio00 timers rlimits00
  thread_different_uid_gid stopped stopped03 child_subreaper pstree dumpable02
  # ... that read /proc/PID by the pid they see, or mount inside the task (its own namespace):
  seccomp_strict seccomp_filter seccomp_filter_tsync seccomp_filter_threads
  seccomp_filter_inheritance file_locks05 file_locks07 inotify01 proc-self pidfd_self
  unhashed_proc tempfs tempfs_overmounted bind-mount mountpoints private_bind_propagation
)
zdtm="$cache/zdtm"
# Built again when the list changes (zdtm/list holds the one it was built from).
if [ ! -f "$zdtm/commands" ] || [ "$(cat "$zdtm/list" 2>/dev/null)" != "${zdtm_tests[*]}" ]; then
  [ -n "${srcdir:-}" ] || { apt_install "${build_pkgs[@]}"; fetch_criu_source; }
  say "building CRIU's zdtm tests for Ferry's test suite"
  st="$srcdir/test/zdtm/static"
  if make -C "$srcdir/test/zdtm/lib" >"$work/zdtm.log" 2>&1; then
    make -C "$st" -k -j"$(nproc)" "${zdtm_tests[@]}" >>"$work/zdtm.log" 2>&1 || true
    mkdir -p "$zdtm"
    : >"$zdtm/commands.new"
    for t in "${zdtm_tests[@]}"; do
      [ -x "$st/$t" ] || { say "warning: zdtm test $t did not build"; continue; }
      install -m 0755 "$st/$t" "$zdtm/$t"
      # Its command line as zdtm runs it (make's rule for TEST.pid names the test's options).
      cmd=$(make -s -C "$st" -n "$t.pid" 2>/dev/null | grep "^\./$t " | tail -n1)
      [ -n "$cmd" ] && printf '%s\n' "${cmd#./}" >>"$zdtm/commands.new"
    done
    mv "$zdtm/commands.new" "$zdtm/commands"
    printf '%s\n' "${zdtm_tests[*]}" >"$zdtm/list"
    say "built $(wc -l <"$zdtm/commands") zdtm tests into $zdtm"
  else
    tail -n 20 "$work/zdtm.log" >&2
    say "warning: CRIU's zdtm library did not build (log above); test/migrate/zdtm-*.test.ts will skip"
  fi
fi
mkdir -p "$confdir"
conf="$confdir/config.json"
# A migration's CRIU images (all but memory) live in scratch memory while it runs: /run/ferry
# where /run is a tmpfs (Debian), else /dev/shm/ferry; neither, and they stay on disk.
scratch=""
for d in /run /dev/shm; do
  if [ "$(stat -f -c %T "$d" 2>/dev/null)" = tmpfs ]; then scratch="$d/ferry"; break; fi
done
if [ ! -f "$conf" ] || ! grep -q "\"criu\": *\"$criu_bin\"" "$conf" || { [ -n "$scratch" ] && ! grep -q "\"scratchDir\": *\"$scratch\"" "$conf"; }; then
  if [ -n "$scratch" ]; then
    printf '{\n  "criu": "%s",\n  "scratchDir": "%s"\n}\n' "$criu_bin" "$scratch" >"$conf"
  else
    printf '{\n  "criu": "%s"\n}\n' "$criu_bin" >"$conf"
  fi
  say "wrote $conf (criu: $criu_bin${scratch:+, scratch: $scratch})"
else
  say "$conf already names $criu_bin${scratch:+ and $scratch}"
fi

# ---- pipe sysctls for lazy pages -------------------------------------------------------------
capeff=$(sed -n 's/^CapEff:[[:space:]]*//p' /proc/self/status)
if [ $(( (16#$capeff >> 24) & 1 )) -eq 0 ]; then  # bit 24 = CAP_SYS_RESOURCE
  cur_max=$(sysctl -n fs.pipe-max-size)
  cur_soft=$(sysctl -n fs.pipe-user-pages-soft)
  if [ "$cur_max" -lt 4194304 ] || [ "$cur_soft" -ne 0 ]; then
    sysctl -q -w fs.pipe-max-size=4194304 fs.pipe-user-pages-soft=0
    say "root lacks CAP_SYS_RESOURCE: raised fs.pipe-max-size to 4 MiB and set fs.pipe-user-pages-soft=0 for CRIU lazy pages"
  else
    say "pipe sysctls already fit CRIU lazy pages"
  fi
else
  say "root has CAP_SYS_RESOURCE: pipe sysctls left alone"
fi

# ---- Node ------------------------------------------------------------------------------------
if [ $want_node = 1 ]; then
  command -v node >/dev/null 2>&1 || die "Node.js 20 is not installed; install it, then re-run"
  cd "$repo"
  if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    say "npm ci"
    npm ci --no-audit --no-fund --loglevel=error
  else
    say "node_modules up to date"
  fi
  say "building Ferry (TypeScript and the native shim and workloads)"
  npm run --silent build
  chmod +x "$repo/dist/src/cli/main.js"
  if [ "$(readlink /usr/local/bin/ferry 2>/dev/null)" != "$repo/dist/src/cli/main.js" ]; then
    ln -sf "$repo/dist/src/cli/main.js" /usr/local/bin/ferry
    say "linked /usr/local/bin/ferry -> $repo/dist/src/cli/main.js"
  fi
fi
say "done"
