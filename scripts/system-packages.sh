#!/usr/bin/env bash
# Install the system packages Kiln's tests need (Debian/Ubuntu, as root):
#   postgresql  the state store's PostgreSQL tests (scripts/postgres-for-tests.sh starts one)
#   bubblewrap  the sandbox every `kiln server` worker runs in (docs/architecture.md)
#   curl        tests run the curl commands the CLI prints, as a user pastes them
#   mmdebstrap  kiln build's default base image (a minimal Debian with Python)
#   podman      tests load and run the images kiln build writes (with runc)
#   skopeo      tests inspect them; kiln build --push copies with it
#   runc uidmap podman's runtime here (crun fails on these machines' cgroups), user ids
#   chromium    tests/test_console.py drives the web console in it (Playwright)
# Tests that need a missing package skip and name this script (with CI=true they fail).
# Usage: sudo ./scripts/system-packages.sh        (--check: list what is missing, install nothing)
set -euo pipefail
PACKAGES=(postgresql bubblewrap curl mmdebstrap podman skopeo runc uidmap chromium)

present() {
  case "$1" in
    postgresql) command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 ;;
    bubblewrap) command -v bwrap >/dev/null 2>&1 ;;
    mmdebstrap) command -v mmdebstrap >/dev/null 2>&1 ;;
    podman) command -v podman >/dev/null 2>&1 ;;
    skopeo) command -v skopeo >/dev/null 2>&1 ;;
    runc) command -v runc >/dev/null 2>&1 || [ -x /usr/sbin/runc ] ;;
    uidmap) command -v newuidmap >/dev/null 2>&1 ;;
    chromium) [ -x /usr/bin/chromium ] ;;
    *) command -v "$1" >/dev/null 2>&1 ;;
  esac
}

missing=()
for package in "${PACKAGES[@]}"; do
  present "$package" || missing+=("$package")
done
if [ "${1:-}" = "--check" ]; then
  [ ${#missing[@]} = 0 ] || echo "${missing[*]}"
  exit 0
fi
if [ ${#missing[@]} = 0 ]; then
  echo "System packages for the tests: all present (${PACKAGES[*]})."
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "Error: no apt-get here; install these with your package manager: ${missing[*]}" >&2
  exit 1
fi
if [ "$(id -u)" != 0 ]; then
  echo "Error: installing ${missing[*]} needs root: sudo $0" >&2
  exit 1
fi
echo "Installing system packages for the tests: ${missing[*]} (apt-get) ..."
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
echo "Installed: ${missing[*]}."
