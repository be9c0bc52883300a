#!/bin/sh
# The initramfs's /init (busybox): load the virtio modules, mount the root image, hand over
# to the guest script (tests/vm/guest.sh, installed as /sbin/fos-guest).
bb=/bin/busybox
$bb mkdir -p /proc /dev /newroot
$bb mount -t proc proc /proc
$bb mount -t devtmpfs dev /dev
for m in @MODULES@; do
    $bb insmod "/modules/$m" || echo "FOS-VM: insmod $m failed"
done
i=0
while [ ! -b /dev/vda ] && [ "$i" -lt 100 ]; do $bb sleep 0.1; i=$((i + 1)); done
if ! $bb mount -t ext4 /dev/vda /newroot; then
    echo "FOS-VM: no root disk"
    echo "FOS-VM: exit 1"
    $bb poweroff -f
fi
$bb umount /proc
$bb mount --move /dev /newroot/dev
exec $bb switch_root /newroot /sbin/fos-guest
