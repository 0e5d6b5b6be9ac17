# Sourced by scripts/test.sh and scripts/test-arm.sh: apt_install [OPTION...] PKG... installs Debian packages when
# running as root with apt-get (as CI does), updating the package lists once if the first try fails.
# Returns non-zero if it could not (not root, no apt-get, or apt failed); prints nothing itself.
apt_install() {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q "$@" >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "$@" >/dev/null 2>&1; }
}
