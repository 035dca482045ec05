# buildbot.tac of the pyworker container image: the worker is configured from the
# environment, as in the official buildbot-worker image and as Buildbot's Docker and
# Kubernetes latent workers start their containers (BUILDMASTER, BUILDMASTER_PORT,
# BUILDMASTER_PROTOCOL, WORKERNAME, WORKERPASS). pyworker runs it as twistd would.
import fnmatch
import os
import sys

from twisted.application import service
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevelFilterPredicate,
    textFileLogObserver,
)

from buildbot_worker.bot import Worker

basedir = os.environ.get("BUILDBOT_BASEDIR", os.path.abspath(os.path.dirname(__file__)))
application = service.Application('buildbot-worker')
# the log goes to stdout: `docker logs`, `kubectl logs`
application.setComponent(
    ILogObserver,
    FilteringLogObserver(textFileLogObserver(sys.stdout), predicates=[LogLevelFilterPredicate()]),
)

buildmaster_host = os.environ.get("BUILDMASTER", "localhost")
port = int(os.environ.get("BUILDMASTER_PORT", 9989))
protocol = os.environ.get("BUILDMASTER_PROTOCOL", "pb")
workername = os.environ.get("WORKERNAME", "docker")
passwd = os.environ.get("WORKERPASS")

# Before the worker starts anything: the password (and whatever else the blacklist's
# shell patterns name) leaves the environment, so that no build inherits it, no step
# header shows it and getWorkerInfo does not report it.
blacklist = os.environ.get("WORKER_ENVIRONMENT_BLACKLIST", "WORKERPASS").split()
for name in list(os.environ):
    if any(fnmatch.fnmatch(name, pattern) for pattern in blacklist):
        del os.environ[name]

s = Worker(buildmaster_host, port, workername, passwd, basedir, 600,
           umask=None, maxdelay=300, protocol=protocol, allow_shutdown=None,
           maxRetries=10, delete_leftover_dirs=False)
s.setServiceParent(application)
