#!/usr/bin/env bash
# ensure-tool.sh PACKAGE WHY COMMAND...: installs the Debian package PACKAGE if none of COMMAND is on PATH.
# The tests need a few real programs (headless Chromium renders report.html; docker-compose validates the
# compose file). CI runs `make test` on a fresh Debian machine as root: apt-get works there. Where it cannot
# (no root, no apt, no network), this says so and exits 0, and the tests that need the program fail with the
# same instructions: they never skip, because a page nobody rendered or a file nobody validated is not tested.
set -u
package=$1 why=$2
shift 2
for name in "$@"; do
  command -v "$name" >/dev/null 2>&1 && exit 0
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing $package (apt-get): $why"
  export DEBIAN_FRONTEND=noninteractive
  if (apt-get install -y -qq --no-install-recommends "$package" >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends "$package" >/dev/null 2>&1; }); then
    exit 0
  fi
fi
echo "$package is missing and could not be installed here ($why): those tests will fail." \
     "Install it with: apt-get install -y $package" >&2
exit 0
