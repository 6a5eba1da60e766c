#!/usr/bin/env bash
# check_disk.sh DIR NEED_MB WHAT
# Stops early, naming the folder and the shortfall, when the filesystem that holds DIR (or its
# nearest existing parent) has less than NEED_MB megabytes free. Used before the venv install
# (torch alone unpacks to ~0.8 GB) and before `make demo` writes its volumes and shards, so a full
# disk is reported as such instead of a pip OSError or a half-written shard set.
# CHECK_DISK=0 skips the check.
set -euo pipefail
dir=$1 need_mb=$2 what=$3
[ "${CHECK_DISK:-1}" = 0 ] && exit 0
probe=$dir
while [ ! -e "$probe" ]; do probe=$(dirname "$probe"); done
avail_mb=$(( $(df -Pk "$probe" | awk 'NR==2 {print $4}') / 1024 ))
if [ "$avail_mb" -lt "$need_mb" ]; then
    echo "error: $what needs about $need_mb MB free where $dir lives ($probe), but only $avail_mb MB are free." >&2
    echo "       Free some space there (or point it at another disk), then rerun; CHECK_DISK=0 skips this check." >&2
    exit 1
fi
