#!/bin/sh
# Peers the benchmarks run side by side that the tests do not need (scripts/setup.sh has the rest).
set -e
apt-get install -y restic
