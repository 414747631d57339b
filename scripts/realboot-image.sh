#!/bin/sh
# Builds the Debian 13 (trixie) VM image that the real-boot test boots, from Debian's package
# registry with debootstrap: kernel, systemd, cloud-init (NoCloud), OpenSSH, netplan, as on
# Debian's cloud images, with cloud-init's default user named `admin` as on Debian's AMIs.
# The image, its kernel and initrd, and the downloaded packages are cached; a cached image is
# reused until this script changes. Prints the directory that holds the image.
# Usage: scripts/realboot-image.sh [CACHE_DIR]   (default: ~/.cache/edgecdn/realboot)
set -eu

suite=trixie
mirror=http://deb.debian.org/debian
cache=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/edgecdn/realboot}
version=$(sha256sum "$0" | cut -c1-12)
out="$cache/image-$suite-$version"

if [ -f "$out/base.qcow2" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ]; then
  echo "$out"
  exit 0
fi
[ "$(id -u)" -eq 0 ] || { echo "realboot-image: debootstrap needs root" >&2; exit 1; }

mkdir -p "$cache/debs"
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM
root="$work/root"

packages="systemd-sysv,udev,dbus,kmod,iproute2,procps,linux-image-amd64,initramfs-tools,zstd,\
cloud-init,netplan.io,systemd-resolved,openssh-server,sudo,ca-certificates,curl,python3,\
unattended-upgrades,gpg,less"
debootstrap --variant=minbase --include="$packages" --cache-dir="$cache/debs" \
  "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -n 30 "$work/debootstrap.log" >&2
  exit 1
}

cat >"$root/etc/apt/sources.list.d/debian.sources" <<SOURCES
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
rm -f "$root/etc/apt/sources.list"
echo "/dev/vda / ext4 defaults,errors=remount-ro 0 1" >"$root/etc/fstab"
echo "edgecdn-realboot" >"$root/etc/hostname"
cat >"$root/etc/cloud/cloud.cfg.d/01-realboot.cfg" <<'CFG'
# As on Debian's AWS images: the NoCloud seed stands in for EC2/Lightsail metadata, and the
# default user is `admin` (locked password, sudo), which edgecdn's adminSshKeys log in as.
datasource_list: [NoCloud, None]
system_info:
  default_user:
    name: admin
    lock_passwd: true
    gecos: Debian
    groups: [adm, sudo]
    sudo: ["ALL=(ALL) NOPASSWD:ALL"]
    shell: /bin/bash
CFG
# The image ships no host keys of its own: cloud-init or the bootstrap makes them per instance.
rm -f "$root"/etc/ssh/ssh_host_*
rm -rf "$root/var/cache/apt/archives"/*.deb "$root/var/lib/apt/lists"/*

cp "$(readlink -f "$root/vmlinuz")" "$work/vmlinuz"
cp "$(readlink -f "$root/initrd.img")" "$work/initrd.img"
chmod 0644 "$work/vmlinuz" "$work/initrd.img"
mkfs.ext4 -q -F -L root -d "$root" "$work/root.raw" 4G
qemu-img convert -O qcow2 "$work/root.raw" "$work/base.qcow2"

mkdir -p "$out"
mv "$work/base.qcow2" "$work/vmlinuz" "$work/initrd.img" "$out/"
echo "$out"
