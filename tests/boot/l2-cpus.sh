#!/bin/busybox sh
# /init of the guest of the many-vCPU test (tests/tests/many_cpus.rs): reports how many CPUs
# the kernel brought online, then runs one busy loop pinned (taskset) to each CPU; each loop
# reports the CPU it was pinned to and the CPU its process last ran on (field 39 of
# /proc/self/stat). A CPU that is not online makes taskset fail, so its line is missing.
# Every result is a line starting with "E2E:". Ends with `reboot -f`.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "E2E: userspace at $(cut -d' ' -f1 /proc/uptime) s"
echo "E2E: nproc=$(nproc) online=$(cat /sys/devices/system/cpu/online) cpuinfo=$(grep -c ^processor /proc/cpuinfo)"
n=$(grep -c ^processor /proc/cpuinfo)
i=0
while [ "$i" -lt "$n" ]; do
    taskset -c "$i" sh -c '
        j=0
        while [ "$j" -lt 300 ]; do j=$((j + 1)); done
        set -- $(cat /proc/self/stat)
        echo "E2E: work pinned=$0 ran=${39} loops=$j"' "$i" &
    i=$((i + 1))
done
wait
echo "E2E: work done at $(cut -d' ' -f1 /proc/uptime) s"
reboot -f
