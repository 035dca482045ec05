#!/bin/sh
# The container's command: pyworker in the foreground on the image's worker directory,
# logging to stdout (the tac's observer). SIGTERM (`docker stop`, Kubernetes) stops it at
# once, as it stops buildbot-worker; SIGUSR2 drains (README, "Operating a worker").
set -e
# the image's WORKDIR is the worker directory (/buildbot), unless BUILDBOT_BASEDIR says
cd "${BUILDBOT_BASEDIR:-.}"
exec pyworker start --nodaemon .
