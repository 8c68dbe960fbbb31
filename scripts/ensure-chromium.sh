#!/usr/bin/env bash
# Installs headless Chromium (the Debian package `chromium`) for the report.html tests, if it is missing.
# CI runs `make test` on a fresh Debian machine as root: apt-get works there. Where it cannot (no root, no apt, no
# network), this says so and exits 0, and the tests that need Chromium fail with the same instructions: they never
# skip, because a page nobody rendered is not tested.
set -u
for name in chromium chromium-browser google-chrome google-chrome-stable; do
  command -v "$name" >/dev/null 2>&1 && exit 0
done
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium (apt-get) for the report.html tests"
  export DEBIAN_FRONTEND=noninteractive
  if (apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; }); then
    exit 0
  fi
fi
echo "chromium is missing and could not be installed here; the report.html tests will fail." \
     "Install it with: apt-get install -y chromium" >&2
exit 0
