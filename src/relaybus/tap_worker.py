"""`twistd relaybus-worker`: request handlers served from RabbitMQ."""

from twisted.application.service import IService

from relaybus.options import WorkerOptions as Options
from relaybus.service import (
    WorkerService,
    exitZeroOnSigterm,
    reloadOnSighup,
    tuneGarbageCollector,
)


def makeService(options: Options) -> IService:
    exitZeroOnSigterm()
    tuneGarbageCollector()
    reloadOnSighup(None, nothingToReread="a worker has nothing to re-read")
    return WorkerService(options.config, options.registry)


__all__ = ["Options", "makeService"]
