#!/bin/sh
# SPDX-License-Identifier: MIT
# Runs an MPI program for CTest: run_mpi.sh <mpiexec> <its arguments: -n 2 program ...>.
# With Open MPI it adds --oversubscribe (more ranks than cores on a small CI machine) and, when
# run as root (containers), --allow-run-as-root, without which Open MPI refuses to start. Other
# MPI implementations get the command unchanged.
set -eu
mpiexec=$1
shift
if "$mpiexec" --version 2>/dev/null | grep -q -e "Open MPI" -e "OpenRTE"; then
  if [ "$(id -u)" -eq 0 ]; then
    exec "$mpiexec" --oversubscribe --allow-run-as-root "$@"
  fi
  exec "$mpiexec" --oversubscribe "$@"
fi
exec "$mpiexec" "$@"
