#!/usr/bin/env bash
# See bench/nbd.sh.
exec "$(dirname "$0")/bench/nbd.sh" "$@"
