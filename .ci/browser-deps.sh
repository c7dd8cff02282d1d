#!/bin/sh
# Installs the browser the playground test drives (Debian's Chromium) when it is missing.
# The Python driver comes from pip (`pip install -e '.[dev]'` pulls in playwright); its own
# browser download (`playwright install`) is not used.
set -eu

if [ -x /usr/bin/chromium ]; then
    echo "browser-deps: /usr/bin/chromium is present"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends chromium
/usr/bin/chromium --version
