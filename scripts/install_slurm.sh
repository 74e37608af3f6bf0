#!/usr/bin/env bash
# Install what slurm/local_cluster.py needs to run a real single-node Slurm cluster (with
# accounting, so that `sacct` works for submitit) on Debian/Ubuntu:
#   slurm-wlm munge                                   (slurmctld, slurmd, client commands)
#   slurmdbd mariadb-server  (--no-install-recommends) (accounting storage for sacct)
# Idempotent: installs only the missing packages, and does nothing when all are present.
# Never fails the build: without root or apt-get it prints what to install and exits 0.
set -u

required=(slurm-wlm munge)
accounting=(slurmdbd mariadb-server)

is_installed() {
	dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

missing_of() {
	local p out=()
	for p in "$@"; do
		is_installed "$p" || out+=("$p")
	done
	echo "${out[@]:-}"
}

if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
	if command -v slurmctld >/dev/null 2>&1 && command -v slurmdbd >/dev/null 2>&1 \
		&& command -v munged >/dev/null 2>&1 && command -v mariadbd >/dev/null 2>&1; then
		exit 0
	fi
	echo "slurm-deps: no apt-get here; install Slurm (slurmctld, slurmd, slurmdbd), munge and" \
		"MariaDB yourself, or the tests marked 'slurm' will fail." >&2
	exit 0
fi

missing_required=$(missing_of "${required[@]}")
missing_accounting=$(missing_of "${accounting[@]}")
if [ -z "$missing_required" ] && [ -z "$missing_accounting" ]; then
	exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
	echo "slurm-deps: not root, so not installing. The tests marked 'slurm' need:" >&2
	[ -n "$missing_required" ] && echo "  sudo apt-get install -y $missing_required" >&2
	[ -n "$missing_accounting" ] && \
		echo "  sudo apt-get install -y --no-install-recommends $missing_accounting" >&2
	exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt_install() {
	# Try without refreshing the package lists first; update them only if that fails.
	apt-get install -y -q "$@" || { apt-get update -q && apt-get install -y -q "$@"; }
}

status=0
if [ -n "$missing_required" ]; then
	echo "slurm-deps: installing $missing_required"
	# shellcheck disable=SC2086
	apt_install $missing_required || status=1
fi
if [ -n "$missing_accounting" ]; then
	echo "slurm-deps: installing $missing_accounting (--no-install-recommends)"
	# shellcheck disable=SC2086
	apt_install --no-install-recommends $missing_accounting || status=1
fi
if [ "$status" -ne 0 ]; then
	echo "slurm-deps: installation failed; the tests marked 'slurm' will fail until" \
		"slurm-wlm munge slurmdbd mariadb-server are installed." >&2
fi
exit 0
