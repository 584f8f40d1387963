#!/bin/bash
# usage: split.sh PID -- cmd...   prints user/sys ticks of PID over cmd
pid=$1; shift
read u0 s0 < <(awk '{print $14, $15}' /proc/$pid/stat)
"$@" > /tmp/split.out 2>&1
read u1 s1 < <(awk '{print $14, $15}' /proc/$pid/stat)
echo "user $((u1-u0)) sys $((s1-s0)) ticks; $(grep -E '^requests' /tmp/split.out)"
