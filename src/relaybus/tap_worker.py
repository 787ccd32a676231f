"""`twistd relaybus-worker`: request handlers served from RabbitMQ."""

from twisted.application.service import IService

from relaybus.options import WorkerOptions as Options
from relaybus.service import WorkerService, exitZeroOnSigterm, tuneGarbageCollector


def makeService(options: Options) -> IService:
    exitZeroOnSigterm()
    tuneGarbageCollector()
    return WorkerService(options.config, options.registry)


__all__ = ["Options", "makeService"]
