#!/bin/sh
# pid 1 of the test VM: a pure cgroup v2 hierarchy with every controller enabled below the
# root, zram swap (for memory.reclaim), then the pytest selection as root. Results go to the
# serial console; "FOS-VM: exit N" is the last word, then the VM powers off.
export PATH=/bin:/sbin HOME=/root LANG=C.UTF-8
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs -o mode=1777 tmp /tmp
mount -t cgroup2 cgroup2 /sys/fs/cgroup
for c in $(cat /sys/fs/cgroup/cgroup.controllers); do
    echo "+$c" >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null
done
echo "FOS-VM: kernel $(uname -r), cgroup2 controllers: $(cat /sys/fs/cgroup/cgroup.subtree_control)"
loaded=yes
for m in $(cat /lib/modules/order); do insmod "/lib/modules/$m" || loaded=no; done
if [ "$loaded" = yes ] && echo 512M >/sys/block/zram0/disksize && mkswap /dev/zram0 >/dev/null &&
    swapon /dev/zram0; then
    echo "FOS-VM: zram swap on (512M)"
else
    echo "FOS-VM: zram swap unavailable"
fi
ip link set lo up
mount -t ext4 /dev/vdb /work
cd /work/src || exit 1
@PYTHON@ -m pytest -q -p no:cacheprovider -o addopts="" -m "not slow" -ra --color=no $(cat /work/selection)
rc=$?
# fos-host doctor's verdicts on this kernel, kept by the harness as build/vm/run/doctor-vm.json
@PYTHON@ -m fos_host.cli doctor --json 2>&1 | sed 's/^/FOS-VM-DOCTOR: /'
echo "FOS-VM: exit $rc"
sync
poweroff -f
