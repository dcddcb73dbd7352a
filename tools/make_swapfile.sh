#!/usr/bin/env bash
# Create and enable a swap file so a merge that needs more than physical RAM is slowed, not killed.
# Usage: sudo bash tools/make_swapfile.sh 16G [/swapfile]
# Each command is printed before it runs. Under WSL, swap is set in %UserProfile%\.wslconfig instead:
#   [wsl2]
#   memory=14GB
#   swap=16GB
# then `wsl --shutdown` from Windows.
set -euo pipefail
size="${1:?usage: make_swapfile.sh SIZE (e.g. 16G) [PATH]}"
path="${2:-/swapfile}"
if grep -qi microsoft /proc/sys/kernel/osrelease 2>/dev/null; then
  echo "WSL detected: set swap=$size under [wsl2] in %UserProfile%\\.wslconfig and run 'wsl --shutdown' instead." >&2
  exit 1
fi
if [ -e "$path" ]; then
  echo "$path already exists; choose another path or remove it first." >&2
  exit 1
fi
run() { printf '+ %s\n' "$*"; "$@"; }
run fallocate -l "$size" "$path" || run dd if=/dev/zero of="$path" bs=1M count="$(numfmt --from=iec "$size" | awk '{print int($1/1048576)}')"
run chmod 600 "$path"
run mkswap "$path"
run swapon "$path"
run swapon --show
echo "To keep it after a reboot, add to /etc/fstab:  $path none swap sw 0 0"
