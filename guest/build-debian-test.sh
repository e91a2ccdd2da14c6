#!/usr/bin/env bash
# Builds the test image of Debian's own dynamically linked programs (guest/README.md):
#   guest/debian-test/out/initrd.cpio.gz   the default initramfs (guest/out) with a second
#                                          archive appended (the kernel unpacks both): Debian
#                                          trixie's riscv64 libc6 and libgcc-s1, coreutils'
#                                          date as /opt/debian/bin/date, the test programs of
#                                          guest/debian-programs/*.c built with Debian's
#                                          riscv64 cross compiler as /usr/bin/ftvm-*,
#                                          the ext2 modules and /usr/share/ftvm/mount-disk
#   guest/debian-test/out/disk.img         an ext2 file system with files for ftvm-files
#   guest/debian-test/out/redis-initrd.cpio.gz
#                                          the default initramfs with Debian trixie's
#                                          redis-server and redis-cli (8.0) and the
#                                          libraries they need: a real service for the
#                                          replication tests, driven by Debian's
#                                          redis-cli on the host
# Downloaded .debs and the private apt state are kept in guest/debian-test; a second run
# with the same inputs is instant. Run guest/build.sh first (this builds on guest/out).
# Works on Debian bookworm as root (it installs gcc-riscv64-linux-gnu and the few tools it
# lacks); the archive is the machine's own, as for guest/build.sh.
#
# Usage: guest/build-debian-test.sh [--force] [--refresh]
#   --force    rebuild even when up to date
#   --refresh  ask the archive for the current packages instead of the cached .debs
set -euo pipefail

TEST_GUEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly TEST_GUEST_DIR

# guest/build.sh's functions: the archive URI read from the machine's apt sources, apt
# with a private state, module signature stripping. Read without its directory settings
# (this script has its own) and without its last line, the call of its main.
eval "$(sed -e '$d' -e '/^readonly \(CACHE_DIR\|DEB_DIR\|APT_DIR\|OUT_DIR\)=/d' \
    -e '/^GUEST_DIR=/d' -e '/^readonly GUEST_DIR$/d' "$TEST_GUEST_DIR/build.sh")"
for f in say die private_apt update_private_index strip_module_signature newest_cached_deb; do
    declare -F "$f" >/dev/null || { echo "guest: error: guest/build.sh no longer defines $f" >&2; exit 1; }
done

readonly GUEST_DIR=$TEST_GUEST_DIR
readonly CACHE_DIR=$GUEST_DIR/debian-test
readonly DEB_DIR=$CACHE_DIR/debs
readonly APT_DIR=$CACHE_DIR/apt
readonly OUT_DIR=$CACHE_DIR/out
readonly DEFAULT_INITRD=$GUEST_DIR/out/initramfs.cpio.gz
readonly KERNEL_DEBS=$GUEST_DIR/cache/debs
readonly PROGRAMS_DIR=$GUEST_DIR/debian-programs
readonly CROSS=riscv64-linux-gnu
# libc6 depends on libgcc-s1 (thread cancellation unwinds with it); coreutils for date;
# redis-tools (redis-server is its redis-check-rdb under another name, as Debian's
# redis-server package links it) and the libraries its binaries need.
readonly PACKAGES=(libc6 libgcc-s1 coreutils redis-tools libatomic1 libjemalloc2 liblzf1 libssl3t64 libstdc++6
    libsystemd0 libzstd1 zlib1g libcap2 liblz4-1 liblzma5 libgcrypt20 libgpg-error0)
# ext2 is served by the ext4 module, which wants the crc32c driver loaded before it mounts
# (nothing can load it on demand: no modprobe, no modules.dep); the order satisfies the
# dependencies.
readonly DISK_MODULES=(crc32c_generic crc16 mbcache jbd2 ext4)

ensure_test_tools() {
    local -A pkg_of=([apt-get]=apt [dpkg-deb]=dpkg [cpio]=cpio [xz]=xz-utils [gzip]=gzip
                     [mke2fs]=e2fsprogs [sha256sum]=coreutils [find]=findutils
                     ["$CROSS-gcc"]=gcc-$CROSS ["$CROSS-readelf"]=binutils-$CROSS)
    local tool missing=()
    for tool in "${!pkg_of[@]}"; do
        command -v "$tool" >/dev/null || missing+=("${pkg_of[$tool]}")
    done
    [ -r /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
    [ ${#missing[@]} -eq 0 ] && return 0
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    [ "$(id -u)" -eq 0 ] || die "missing packages: ${missing[*]} (install them, or run as root)"
    say "installing ${missing[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# Prints the cached .deb of each package, one a line; fails if one is missing.
cached_debs() {
    local pkg deb
    for pkg in "${PACKAGES[@]}"; do
        deb=$(newest_cached_deb "${pkg}_*_riscv64.deb") || return 1
        echo "$deb"
    done
}

fetch_test_debs() {
    local refresh=$1
    mkdir -p "$DEB_DIR"
    if [ "$refresh" = 0 ] && cached_debs >/dev/null; then
        return 0
    fi
    update_private_index
    say "downloading ${PACKAGES[*]} (trixie, riscv64) into $DEB_DIR"
    (cd "$DEB_DIR" && private_apt apt-get download "${PACKAGES[@]}" >/dev/null)
    cached_debs >/dev/null || die "download of ${PACKAGES[*]} failed"
}

# What the outputs are made from: this script, build.sh's functions, the programs, the
# default initramfs, the .debs and the kernel package (for the modules).
inputs_digest() {
    {
        sha256sum "${BASH_SOURCE[0]}" "$GUEST_DIR/build.sh" "$PROGRAMS_DIR"/*.c "$DEFAULT_INITRD" | awk '{ print $1 }'
        cached_debs | xargs -n1 basename
        basename "$(kernel_deb || echo none)"
    } | sha256sum | awk '{ print $1 }'
}

# The kernel package guest/build.sh used (its modules are the running kernel's).
kernel_deb() {
    local deb
    deb=$(find "$KERNEL_DEBS" -maxdepth 1 -name 'linux-image-6.*-riscv64_*_riscv64.deb' -printf '%p\n' 2>/dev/null \
        | sort -V | tail -n 1)
    [ -n "$deb" ] && echo "$deb"
}

# The shared libraries a binary needs, by name (NEEDED entries), recursively, from $1's tree.
needed_libs() {
    local root=$1 bin=$2 lib
    "$CROSS-readelf" -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | while read -r lib; do
        echo "$lib"
        local path
        path=$(find "$root/usr/lib/$CROSS" "$root/usr/lib" -maxdepth 1 -name "$lib" 2>/dev/null | head -n 1)
        [ -n "$path" ] && needed_libs "$root" "$(readlink -f "$path")"
    done | sort -u
}

# The C library where the programs' interpreter (/lib/ld-linux-riscv64-lp64d.so.1) and the
# multiarch search path find it, and every library the binaries $3... need, from the
# packages unpacked in $1 (and nothing else), into the tree $2. The default image's /lib is
# a directory, so the links go into it (trixie's packages ship under /usr; /lib is a link
# on Debian).
install_runtime() {
    local debs=$1 root=$2 lib
    shift 2
    mkdir -p "$root/usr/lib/$CROSS" "$root/lib"
    cp -a "$debs/usr/lib/ld-linux-riscv64-lp64d.so.1" "$root/usr/lib/"
    ln -sfn ../usr/lib/ld-linux-riscv64-lp64d.so.1 "$root/lib/ld-linux-riscv64-lp64d.so.1"
    ln -sfn ../usr/lib/$CROSS "$root/lib/$CROSS"
    local bin
    for bin in "$@"; do
        needed_libs "$debs" "$bin"
    done | sort -u | while read -r lib; do
        [ -e "$debs/usr/lib/$CROSS/$lib" ] || die "$lib (needed by $*) is in none of: ${PACKAGES[*]}"
        cp -a "$debs/usr/lib/$CROSS/$lib" "$root/usr/lib/$CROSS/"
        # A soname is a link to the versioned file: bring that too.
        if [ -L "$debs/usr/lib/$CROSS/$lib" ]; then
            cp -a "$(readlink -f "$debs/usr/lib/$CROSS/$lib")" "$root/usr/lib/$CROSS/"
        fi
    done
}

# Writes the tree $1 as a reproducible newc archive to $2: fixed timestamps, sorted names.
archive_tree() {
    local tree=$1 out=$2
    find "$tree" -exec touch -h -d @0 {} +
    (cd "$tree" && find . -mindepth 1 -print0 | LC_ALL=C sort -z \
        | cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) \
        | gzip -9n >"$out"
}

# The default initramfs with Debian's redis-server and redis-cli appended.
build_redis_image() {
    local work=$1 debs=$work/debs root=$work/redis
    mkdir -p "$root/usr/bin"
    install -m 0755 "$debs/usr/bin/redis-check-rdb" "$root/usr/bin/redis-server"
    install -m 0755 "$debs/usr/bin/redis-cli" "$root/usr/bin/redis-cli"
    install_runtime "$debs" "$root" "$root/usr/bin/redis-server" "$root/usr/bin/redis-cli"
    archive_tree "$root" "$work/redis.cpio.gz"
    cat "$DEFAULT_INITRD" "$work/redis.cpio.gz" >"$work/out/redis-initrd.cpio.gz"
}

build_test_image() {
    local work=$1 debs=$work/debs root=$work/extra deb lib kdeb
    mkdir -p "$debs" "$root"/{usr/bin,opt/debian/bin,lib/modules,usr/share/ftvm,mnt} "$root/usr/lib/$CROSS"
    while read -r deb; do
        dpkg-deb -x "$deb" "$debs"
    done < <(cached_debs)

    say "building the test programs with $($CROSS-gcc --version | head -n 1)"
    local src name
    for src in "$PROGRAMS_DIR"/*.c; do
        name=ftvm-$(basename "$src" .c)
        "$CROSS-gcc" -O2 -Wall -Wextra -Werror -pthread -o "$root/usr/bin/$name" "$src"
    done
    install -m 0755 "$debs/usr/bin/date" "$root/opt/debian/bin/date"
    install_runtime "$debs" "$root" "$root"/usr/bin/ftvm-* "$root/opt/debian/bin/date"
    say "libraries: $(cd "$root/usr/lib/$CROSS" && echo *)"

    # The ext2 file system's modules, unsigned as guest/build.sh stores the others.
    kdeb=$(kernel_deb) || die "no kernel package in guest/cache/debs: run guest/build.sh first"
    dpkg-deb -x "$kdeb" "$work/kernel"
    local module ko
    for module in "${DISK_MODULES[@]}"; do
        ko=$(find "$work/kernel" -name "$module.ko.xz" | head -n 1)
        [ -n "$ko" ] || die "module $module.ko.xz not in $(basename "$kdeb")"
        xz -dc "$ko" >"$work/$module.ko"
        strip_module_signature "$work/$module.ko"
        xz --check=crc32 --lzma2=dict=1MiB -c "$work/$module.ko" >"$root/lib/modules/$module.ko.xz"
    done
    cat >"$root/usr/share/ftvm/mount-disk" <<EOF
#!/bin/sh
# Mounts the virtio disk's ext2 file system read-only on /mnt (test image only).
for module in ${DISK_MODULES[*]}; do insmod /lib/modules/\$module.ko.xz || exit 1; done
mount -t ext2 -o ro /dev/vda /mnt
EOF
    chmod 0755 "$root/usr/share/ftvm/mount-disk"

    archive_tree "$root" "$work/out/extra.cpio.gz"
    cat "$DEFAULT_INITRD" "$work/out/extra.cpio.gz" >"$work/out/initrd.cpio.gz"

    # The disk: an ext2 file system with a text file and 1 MiB of a fixed pattern.
    mkdir -p "$work/disk"
    echo "hello from the virtio disk" >"$work/disk/hello.txt"
    awk 'BEGIN { x = 1; for (i = 0; i < 1048576; i++) { x = (x * 75 + 74) % 65537; printf "%c", 32 + x % 95 } }' \
        >"$work/disk/pattern.bin"
    find "$work/disk" -exec touch -h -d @0 {} +
    truncate -s 8M "$work/out/disk.img"
    E2FSPROGS_FAKE_TIME=0 mke2fs -q -t ext2 -F -d "$work/disk" -U 6b8f3c2e-0f1a-4e5b-9c7d-2a3b4c5d6e7f \
        -E root_owner=0:0,hash_seed=6b8f3c2e-0f1a-4e5b-9c7d-2a3b4c5d6e7f "$work/out/disk.img"
}

test_main() {
    local force=0 refresh=0 arg
    for arg in "$@"; do
        case $arg in
            --force) force=1 ;;
            --refresh) refresh=1 ;;
            -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
            *) die "unknown argument: $arg (try --help)" ;;
        esac
    done
    [ -s "$DEFAULT_INITRD" ] || die "$DEFAULT_INITRD is missing: run guest/build.sh first"
    ensure_test_tools
    if [ "$force" = 0 ] && [ "$refresh" = 0 ] && [ -s "$OUT_DIR/initrd.cpio.gz" ] && [ -s "$OUT_DIR/disk.img" ] \
        && [ -s "$OUT_DIR/redis-initrd.cpio.gz" ] \
        && cached_debs >/dev/null && [ "$(cat "$OUT_DIR/.inputs" 2>/dev/null)" = "$(inputs_digest)" ]; then
        say "up to date, nothing to do: $OUT_DIR/{initrd.cpio.gz,disk.img} (--force rebuilds)"
        return 0
    fi
    fetch_test_debs "$refresh"
    local work
    work=$(mktemp -d "$CACHE_DIR/build.XXXXXX")
    # shellcheck disable=SC2064 # expand now: the trap runs after work is out of scope
    trap "rm -rf '$work'" EXIT
    mkdir -p "$work/out"
    build_test_image "$work"
    build_redis_image "$work"
    inputs_digest >"$work/out/.inputs"
    # Replace the outputs only once everything is built.
    rm -rf "$OUT_DIR"
    mv "$work/out" "$OUT_DIR"
    say "built $OUT_DIR/initrd.cpio.gz ($(stat -c %s "$OUT_DIR/initrd.cpio.gz") bytes), disk.img and" \
        "redis-initrd.cpio.gz ($(stat -c %s "$OUT_DIR/redis-initrd.cpio.gz") bytes)"
}

test_main "$@"
