#!/bin/sh
# Runs inside the image's root (chroot) with /proc, /sys and /dev mounted:
# installs the package, makes the system boot from the virtio disk with the
# network up, and removes every per-machine identity so each VM makes its own.
# Usage: customize.sh /tmp/image/portcullis_VERSION_amd64.deb
set -eu
deb="$1"
export DEBIAN_FRONTEND=noninteractive

dpkg -i "$deb"

# Boot: root by label (the builder labels it), the NIC is eth0, console on
# the serial port; the initramfs holds only what a virtio machine needs.
echo 'LABEL=portcullis-root / ext4 defaults,errors=remount-ro 0 1' > /etc/fstab
printf 'virtio_pci\nvirtio_blk\nvirtio_net\next4\n' > /etc/initramfs-tools/modules
sed -i 's/^MODULES=.*/MODULES=list/' /etc/initramfs-tools/initramfs.conf

# The kernel's modules for a virtual machine only: no sound, graphics,
# wireless, media or exotic hardware, and no firmware.
kernel=$(ls /lib/modules)
cd "/lib/modules/$kernel/kernel"
rm -rf sound drivers/gpu drivers/media drivers/net/wireless drivers/infiniband \
    drivers/staging drivers/bluetooth drivers/isdn drivers/iio drivers/input/touchscreen \
    drivers/usb drivers/hid drivers/scsi drivers/ata drivers/mmc drivers/nfc \
    drivers/net/ethernet drivers/net/can drivers/net/usb drivers/comedi drivers/hwmon \
    drivers/thunderbolt drivers/video drivers/md net/wireless net/bluetooth \
    net/mac80211 fs/ocfs2 fs/btrfs fs/xfs fs/f2fs fs/nfs fs/ceph fs/gfs2 fs/smb
cd /
depmod "$kernel"
update-initramfs -u -k "$kernel"

# The network: DHCP on eth0 by systemd-networkd; the seed can replace it.
cat > /etc/systemd/network/10-eth0.network <<'NET'
[Match]
Name=eth0

[Network]
DHCP=yes
NET
systemctl enable systemd-networkd.service systemd-networkd-wait-online.service
echo portcullis > /etc/hostname

# XDP on the VM's NIC, and the first-boot seed reader.
echo 'PORTCULLIS_IFACES="eth0"' > /etc/portcullis/xdp.env
install -m 0755 /tmp/image/portcullis-seed /usr/sbin/portcullis-seed
install -m 0644 /tmp/image/portcullis-seed.service /etc/systemd/system/
systemctl enable portcullis-seed.service ssh.service

# Root logs in by the seed's SSH key only.
passwd -l root
sed -i 's/^#\?PasswordAuthentication.*/PasswordAuthentication no/' /etc/ssh/sshd_config

# Per-machine identity is made at first boot, never shared by every VM.
rm -f /etc/ssh/ssh_host_* /etc/credstore/portcullis-cache-key /var/lib/dbus/machine-id
: > /etc/machine-id
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /usr/share/doc/*/changelog* /usr/share/man/?? /usr/share/locale/*
rm -rf /tmp/image
