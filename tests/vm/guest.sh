#!/bin/sh
# pid 1 of the test VM. The cgroup layout comes from the kernel command line (fos.cgroup=):
#   v2      cgroup2 alone at /sys/fs/cgroup, every controller enabled below the root
#   hybrid  v1 memory, pids, cpu+cpuacct and freezer, plus cgroup2 at /sys/fs/cgroup/unified
#           with no controllers (systemd's hybrid layout, as on the dev/CI machines)
#   v1      the v1 hierarchies alone
# then zram swap (for memory.reclaim), then the pytest selection as root and as an
# unprivileged user in a delegated cgroup. Results go to the serial console; "FOS-VM: exit N"
# (0 when both runs passed) is the last word, then the VM powers off.
export PATH=/bin:/sbin HOME=/root LANG=C.UTF-8
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs -o mode=1777 tmp /tmp
layout=$(sed -n 's/.*fos\.cgroup=\([a-z0-9]*\).*/\1/p' /proc/cmdline)
cg=/sys/fs/cgroup
hierarchies=""
if [ "$layout" = v2 ]; then
    mount -t cgroup2 cgroup2 $cg
    for c in $(cat $cg/cgroup.controllers); do
        echo "+$c" >$cg/cgroup.subtree_control 2>/dev/null
    done
    hierarchies=$cg
    shown="cgroup2 controllers: $(cat $cg/cgroup.subtree_control)"
else
    mount -t tmpfs -o mode=0755 cgroup $cg
    for c in memory pids cpu,cpuacct freezer; do
        mkdir $cg/${c%,*} && mount -t cgroup -o $c cgroup $cg/${c%,*}
        hierarchies="$hierarchies $cg/${c%,*}"
    done
    if [ "$layout" = hybrid ]; then
        mkdir $cg/unified && mount -t cgroup2 cgroup2 $cg/unified
        hierarchies="$hierarchies $cg/unified"
    fi
    shown="mounted: $(awk '$3 ~ /^cgroup/ {printf "%s ", $2}' /proc/mounts)"
fi
echo "FOS-VM: kernel $(uname -r), cgroup layout $layout, $shown"
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
pytest="FOS_DISK_TMP=/work/tmp @PYTHON@ -m pytest -q -p no:cacheprovider -o addopts= -m 'not slow' -ra --color=no"
doctor="@PYTHON@ -m fos_host.cli doctor --json"

mkdir -p /work/results && chmod 1777 /work/results  # junit XML per run, read by the harness
mkdir -p /work/tmp && chmod 1777 /work/tmp  # a disk (/tmp is in memory): FOS_DISK_TMP
echo "FOS-VM: the selection as root"
sh -c "$pytest --junitxml=/work/results/$layout-root.xml $(cat /work/selection)"
rc=$?
$doctor 2>&1 | sed "s/^/FOS-VM-DOCTOR $layout-root: /"

# The unprivileged run: uid 1000 in a cgroup delegated to it in every hierarchy, as systemd's
# Delegate=yes does (the directory and its cgroup.procs, cgroup.subtree_control,
# cgroup.threads and, in v1, tasks owned by the user).
for h in $hierarchies; do
    mkdir $h/fos-delegated
    for f in $h/fos-delegated $h/fos-delegated/cgroup.procs $h/fos-delegated/cgroup.subtree_control \
        $h/fos-delegated/cgroup.threads $h/fos-delegated/tasks; do
        [ -e "$f" ] && chown 1000:1000 "$f"
    done
done
as_user() {
    (
        for h in $hierarchies; do echo 0 >$h/fos-delegated/cgroup.procs; done
        exec su -s /bin/sh fos-rootless -c "$1"
    )
}
echo "FOS-VM: the selection as fos-rootless (uid 1000) in a delegated cgroup (fos-delegated)"
as_user "$pytest --junitxml=/work/results/$layout-rootless.xml $(cat /work/selection)"
rc_user=$?
as_user "$doctor" 2>&1 | sed "s/^/FOS-VM-DOCTOR $layout-rootless: /"
for h in $hierarchies; do rmdir $h/fos-delegated || rc_user=1; done

echo "FOS-VM: pytest as root: exit $rc; as fos-rootless: exit $rc_user"
[ "$rc" = 5 ] && rc=0
[ "$rc_user" = 5 ] && rc_user=0
[ "$rc" = 0 ] && rc=$rc_user
echo "FOS-VM: exit $rc"
sync
poweroff -f
