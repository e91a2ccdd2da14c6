#!/usr/bin/env bash
# Builds ftvm's default guest image from Debian 13 (trixie) riscv64 packages:
#   guest/out/Image               the kernel (/boot/vmlinux-<version>: a RISC-V "Image" with a PE header)
#   guest/out/initramfs.cpio.gz   busybox-static, the virtio modules and guest/init (newc, gzip)
#   guest/out/cmdline             the default kernel command line (see below)
#   guest/out/kernel-version, guest/out/config-<version>   for reference
# Downloaded .debs are kept in guest/cache; a second run with the same inputs is instant.
# Works on a fresh Debian bookworm machine as root (it installs the few tools it lacks).
#
# Default kernel command line:  console=ttyS0 earlycon=sbi quiet cryptomgr.notests
# plus ftvm.ip=ADDR/PREFIX ftvm.gw=GW ftvm.cmd=<base64 of a shell command> (guest/README.md).
# cryptomgr.notests and unsigned modules matter: the kernel's crypto self-tests and module
# signature checks would cost about 1 billion guest instructions on top of the 0.73 billion
# this boot takes (guest/README.md, DESIGN.md §4).
#
# Usage: guest/build.sh [--force] [--refresh]
#   --force    rebuild guest/out even when it is up to date
#   --refresh  ask the archive for the current kernel and busybox instead of the cached .debs
# Environment: FTVM_DEBIAN_URI overrides the archive URI read from the machine's apt sources.
set -euo pipefail

readonly SUITE=trixie
readonly KERNEL_META=linux-image-riscv64
readonly BUSYBOX_PKG=busybox-static
# Load order of /init; virtio and virtio_ring are built in, rng-core (hw_random) is built in,
# virtio-rng is a module. The package has no modules.dep: this order satisfies the dependencies.
readonly MODULES=(failover net_failover virtio_mmio virtio_blk virtio_net virtio-rng)
readonly DEFAULT_CMDLINE="console=ttyS0 earlycon=sbi quiet cryptomgr.notests"

GUEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly GUEST_DIR
readonly CACHE_DIR=$GUEST_DIR/cache
readonly DEB_DIR=$CACHE_DIR/debs
readonly APT_DIR=$CACHE_DIR/apt
readonly OUT_DIR=$GUEST_DIR/out

say() { printf 'guest: %s\n' "$*" >&2; }
die() { printf 'guest: error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# Tools

ensure_tools() {
    local -A pkg_of=([apt-get]=apt [dpkg-deb]=dpkg [cpio]=cpio [xz]=xz-utils [gzip]=gzip
                     [od]=coreutils [sha256sum]=coreutils [truncate]=coreutils [awk]=mawk
                     [find]=findutils)
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
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ---------------------------------------------------------------------------------------------
# The archive: the machine's own apt configuration names it; we only borrow the URI.

# Prints the URI of the main Debian entry of a deb822 .sources file: type deb, enabled, and a
# Suites field holding a Debian suite name without a dash (bookworm, not bookworm-security).
deb822_debian_uri() {
    awk '
        function flush() {
            if (found) return
            if (types ~ / deb / && enabled != "no" && plain && uri != "") { print uri; found = 1; exit }
            types = ""; uri = ""; enabled = ""; plain = 0
        }
        function plain_debian_suite(list,   n, i, w) {
            n = split(list, w, /[ \t]+/)
            for (i = 1; i <= n; i++)
                if (w[i] ~ /^(oldoldstable|oldstable|stable|testing|unstable|sid|buster|bullseye|bookworm|trixie|forky|duke)$/)
                    return 1
            return 0
        }
        /^[ \t]*#/ { next }
        /^[ \t]*$/ { flush(); next }
        /^[A-Za-z-]+:/ {
            key = tolower(substr($0, 1, index($0, ":") - 1))
            val = substr($0, index($0, ":") + 1)
            if (key == "types") types = " " val " "
            else if (key == "uris") { split(val, u, /[ \t]+/); uri = (u[1] != "" ? u[1] : u[2]) }
            else if (key == "suites") plain = plain_debian_suite(val)
            else if (key == "enabled") { gsub(/[ \t]/, "", val); enabled = tolower(val) }
        }
        END { flush() }
    ' "$1"
}

# Same for a one-line-style sources.list: "deb [options] URI SUITE COMPONENTS...".
one_line_debian_uri() {
    awk '
        $1 != "deb" { next }
        {
            i = 2
            if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
            if ($(i + 1) ~ /^(oldoldstable|oldstable|stable|testing|unstable|sid|buster|bullseye|bookworm|trixie|forky|duke)$/) { print $i; exit }
        }
    ' "$1"
}

system_archive_uri() {
    local f uri
    if [ -n "${FTVM_DEBIAN_URI:-}" ]; then echo "$FTVM_DEBIAN_URI"; return; fi
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        uri=$(deb822_debian_uri "$f")
        [ -n "$uri" ] && { echo "$uri"; return; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        uri=$(one_line_debian_uri "$f")
        [ -n "$uri" ] && { echo "$uri"; return; }
    done
    die "no Debian archive found in /etc/apt/sources.list{,.d}; set FTVM_DEBIAN_URI"
}

# Runs apt-get or apt-cache against the private state in guest/cache/apt, for riscv64 only.
# The system's apt configuration (lists, sources, status, preferences) is not read or touched,
# apart from apt.conf.d, which may carry a proxy the machine needs.
private_apt() {
    local tool=$1; shift
    local sandbox=()
    # apt-get download writes into the current directory (guest/cache/debs), which the
    # unprivileged _apt user may not reach: download as root rather than warn every time.
    [ "$(id -u)" -eq 0 ] && sandbox=(-o APT::Sandbox::User=root)
    "$tool" -q \
        -o Dir::State="$APT_DIR/state" \
        -o Dir::State::status="$APT_DIR/state/status" \
        -o Dir::State::Lists="$APT_DIR/lists" \
        -o Dir::Cache="$APT_DIR/cache" \
        -o Dir::Etc::SourceList="$APT_DIR/sources.list" \
        -o Dir::Etc::SourceParts=/dev/null \
        -o Dir::Etc::Preferences=/dev/null \
        -o Dir::Etc::PreferencesParts=/dev/null \
        -o APT::Architecture=riscv64 \
        -o APT::Architectures=riscv64 \
        -o Acquire::Languages=none \
        -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false \
        -o Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false \
        -o Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false \
        -o Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false \
        "${sandbox[@]}" "$@"
}

# Writes the private source line and fetches the trixie index. Signatures are verified with
# debian-archive-keyring: bookworm's package (2023.3+deb12u2 and later) holds the trixie
# keys, and trixie's Release is also signed with the bookworm archive key, so the bookworm
# keyring verifies it. If verification still fails, the keyring package is upgraded from the
# machine's own (verified) archive and we retry; only then do we fall back to trusted=yes,
# loudly, because an unverified kernel is better than no guest for a development image.
update_private_index() {
    local uri keyring=/usr/share/keyrings/debian-archive-keyring.gpg log
    uri=$(system_archive_uri)
    mkdir -p "$APT_DIR/state" "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial"
    : >"$APT_DIR/state/status"
    say "archive (from the machine's apt sources): $uri, suite $SUITE, riscv64"
    log=$APT_DIR/update.log
    local attempt
    for attempt in verified upgraded-keyring trusted; do
        case $attempt in
            verified) echo "deb [signed-by=$keyring] $uri $SUITE main" >"$APT_DIR/sources.list" ;;
            upgraded-keyring)
                [ "$(id -u)" -eq 0 ] || continue
                say "signature check failed; upgrading debian-archive-keyring and retrying"
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debian-archive-keyring >/dev/null || continue ;;
            trusted)
                say "WARNING: cannot verify the $SUITE archive signature; using trusted=yes"
                echo "deb [trusted=yes] $uri $SUITE main" >"$APT_DIR/sources.list" ;;
        esac
        if private_apt apt-get update >"$log" 2>&1 \
            && ! grep -qE 'NO_PUBKEY|GPG error|not signed|EXPKEYSIG|BADSIG' "$log"; then
            return 0
        fi
    done
    cat "$log" >&2
    die "apt-get update of the private $SUITE index failed"
}

newest_cached_deb() { # $1 = glob under guest/cache/debs
    local matches
    matches=$(find "$DEB_DIR" -maxdepth 1 -name "$1" -printf '%f\n' | sort -V | tail -n 1)
    [ -n "$matches" ] && echo "$DEB_DIR/$matches"
}

# Sets KERNEL_DEB and BUSYBOX_DEB, downloading them only when not cached (or --refresh).
fetch_debs() {
    local refresh=$1 kernel_pkg
    mkdir -p "$DEB_DIR"
    KERNEL_DEB=$(newest_cached_deb 'linux-image-6.*-riscv64_*_riscv64.deb' || true)
    BUSYBOX_DEB=$(newest_cached_deb "${BUSYBOX_PKG}_*_riscv64.deb" || true)
    if [ "$refresh" = 0 ] && [ -n "$KERNEL_DEB" ] && [ -n "$BUSYBOX_DEB" ]; then
        say "using cached packages: $(basename "$KERNEL_DEB"), $(basename "$BUSYBOX_DEB")"
        return 0
    fi
    update_private_index
    # The metapackage depends on exactly one versioned image package: linux-image-6.x-riscv64.
    kernel_pkg=$(private_apt apt-cache depends "$KERNEL_META" \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-6\.[^ ]*-riscv64$/ { print $2; exit }')
    [ -n "$kernel_pkg" ] || die "cannot resolve $KERNEL_META to a linux-image-6.x-riscv64 package"
    say "$KERNEL_META -> $kernel_pkg"
    say "downloading $kernel_pkg and $BUSYBOX_PKG (about 115 MB) into guest/cache/debs"
    (cd "$DEB_DIR" && private_apt apt-get download "$kernel_pkg" "$BUSYBOX_PKG" >/dev/null)
    KERNEL_DEB=$(newest_cached_deb "${kernel_pkg}_*_riscv64.deb") || die "download of $kernel_pkg failed"
    BUSYBOX_DEB=$(newest_cached_deb "${BUSYBOX_PKG}_*_riscv64.deb") || die "download of $BUSYBOX_PKG failed"
}

# ---------------------------------------------------------------------------------------------
# Modules: stored without their appended signature. An unsigned module loads (the kernel does
# not force signatures; it only taints), and skipping the PKCS#7 check saves many instructions.

le_uint() { # $1 = file, $2 = offset, $3 = byte count: prints the little-endian unsigned value
    od -An -v -tu1 -j "$2" -N "$3" "$1" | awk '{ for (i = NF; i >= 1; i--) v = v * 256 + $i } END { print v + 0 }'
}

# Truncates an uncompressed .ko before "<sig><struct module_signature, 12 bytes>~Module
# signature appended~\n". Keeps the file signed (and says so) if the result would not end
# exactly at the ELF section header table, which is where an unsigned module ends.
strip_module_signature() {
    local ko=$1 size siglen new_size shoff shentsize shnum
    size=$(stat -c %s "$ko")
    [ "$(tail -c 28 "$ko")" = "~Module signature appended~" ] || return 0
    siglen=$(od -An -v -tu1 -j $((size - 32)) -N 4 "$ko" | awk '{ print (($1 * 256 + $2) * 256 + $3) * 256 + $4 }')
    new_size=$((size - 28 - 12 - siglen))
    shoff=$(le_uint "$ko" 40 8); shentsize=$(le_uint "$ko" 58 2); shnum=$(le_uint "$ko" 60 2)
    if [ $((shoff + shentsize * shnum)) -ne "$new_size" ]; then
        say "WARNING: $(basename "$ko"): unexpected signature layout, kept signed"
        return 0
    fi
    truncate -s "$new_size" "$ko"
}

# ---------------------------------------------------------------------------------------------
# Build

build_image() {
    local work=$1 kroot=$1/kernel broot=$1/busybox root=$1/initramfs version
    mkdir -p "$kroot" "$broot" "$root"
    say "unpacking $(basename "$KERNEL_DEB")"
    dpkg-deb -x "$KERNEL_DEB" "$kroot"
    dpkg-deb -x "$BUSYBOX_DEB" "$broot"
    version=$(find "$kroot/boot" -maxdepth 1 -name 'vmlinux-*' -printf '%f\n' | sed 's/^vmlinux-//' | head -n 1)
    [ -n "$version" ] || die "no /boot/vmlinux-* in $(basename "$KERNEL_DEB")"
    say "kernel $version"
    cp "$kroot/boot/vmlinux-$version" "$work/out/Image"
    cp "$kroot/boot/config-$version" "$work/out/config-$version"
    echo "$version" >"$work/out/kernel-version"
    echo "$DEFAULT_CMDLINE" >"$work/out/cmdline"

    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,etc,lib/modules}
    local busybox
    busybox=$(find "$broot" -path '*bin/busybox' -type f | head -n 1)
    [ -n "$busybox" ] || die "no busybox binary in $(basename "$BUSYBOX_DEB")"
    install -m 0755 "$busybox" "$root/bin/busybox"
    install -m 0755 "$GUEST_DIR/init" "$root/init"
    # Small services the demo and tests run in the guest (e.g. counter-httpd).
    mkdir -p "$root/usr/share/ftvm"
    install -m 0755 "$GUEST_DIR"/services/* "$root/usr/share/ftvm/"
    # The kernel opens /dev/console for /init before anything is mounted.
    if ! mknod -m 0600 "$root/dev/console" c 5 1 2>/dev/null; then
        say "WARNING: cannot mknod /dev/console (not root): /init reopens it after mounting devtmpfs"
    fi

    local module ko moddir=$kroot/usr/lib/modules/$version
    [ -d "$moddir" ] || moddir=$kroot/lib/modules/$version
    for module in "${MODULES[@]}"; do
        ko=$(find "$moddir/kernel" -name "$module.ko.xz" | head -n 1)
        [ -n "$ko" ] || die "module $module.ko.xz not in the kernel package"
        xz -dc "$ko" >"$work/$module.ko"
        strip_module_signature "$work/$module.ko"
        xz --check=crc32 --lzma2=dict=1MiB -c "$work/$module.ko" >"$root/lib/modules/$module.ko.xz"
    done
    say "modules (unsigned, xz): ${MODULES[*]}"

    # Fixed timestamps and --reproducible inode numbers: same inputs, same initramfs.
    find "$root" -exec touch -h -d @0 {} +
    (cd "$root" && find . -mindepth 1 -print0 | LC_ALL=C sort -z \
        | cpio --null --create --format=newc --owner=0:0 --reproducible --quiet) \
        | gzip -9n >"$work/out/initramfs.cpio.gz"
}

# What the outputs are made from: a digest of this script, /init and the services, then the two .debs.
scripts_digest() {
    sha256sum "$GUEST_DIR/build.sh" "$GUEST_DIR/init" "$GUEST_DIR"/services/* | awk '{ print $1 }' | sha256sum | awk '{ print $1 }'
}

# True when guest/out is complete, built by the current scripts, and (if .debs are cached)
# from the newest cached .debs. An emptied cache alone does not force a download.
outputs_current() {
    local f inputs
    for f in Image initramfs.cpio.gz cmdline kernel-version .inputs; do
        [ -s "$OUT_DIR/$f" ] || return 1
    done
    mapfile -t inputs <"$OUT_DIR/.inputs"
    [ "${inputs[0]:-}" = "$(scripts_digest)" ] || return 1
    if [ -n "${KERNEL_DEB:-}" ] && [ -n "${BUSYBOX_DEB:-}" ]; then
        [ "${inputs[1]:-}" = "$(basename "$KERNEL_DEB")" ] && [ "${inputs[2]:-}" = "$(basename "$BUSYBOX_DEB")" ]
    fi
}

main() {
    local force=0 refresh=0 arg
    for arg in "$@"; do
        case $arg in
            --force) force=1 ;;
            --refresh) refresh=1 ;;
            -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
            *) die "unknown argument: $arg (try --help)" ;;
        esac
    done
    KERNEL_DEB=$(newest_cached_deb 'linux-image-6.*-riscv64_*_riscv64.deb' 2>/dev/null || true)
    BUSYBOX_DEB=$(newest_cached_deb "${BUSYBOX_PKG}_*_riscv64.deb" 2>/dev/null || true)
    if [ "$force" = 0 ] && [ "$refresh" = 0 ] && outputs_current; then
        say "up to date, nothing to do: $OUT_DIR/{Image,initramfs.cpio.gz} (kernel $(cat "$OUT_DIR/kernel-version"); --force rebuilds)"
        return 0
    fi
    ensure_tools
    fetch_debs "$refresh"

    WORK_DIR=$(mktemp -d "$CACHE_DIR/build.XXXXXX")
    trap 'rm -rf "$WORK_DIR"' EXIT
    local work=$WORK_DIR
    mkdir -p "$work/out"
    build_image "$work"
    printf '%s\n' "$(scripts_digest)" "$(basename "$KERNEL_DEB")" "$(basename "$BUSYBOX_DEB")" >"$work/out/.inputs"
    # Replace guest/out only once everything is built: an interrupted run leaves no half image.
    rm -rf "$OUT_DIR"
    mv "$work/out" "$OUT_DIR"
    say "built $OUT_DIR/Image ($(stat -c %s "$OUT_DIR/Image") bytes) and initramfs.cpio.gz ($(stat -c %s "$OUT_DIR/initramfs.cpio.gz") bytes)"
    say "default command line: $DEFAULT_CMDLINE"
}

main "$@"
