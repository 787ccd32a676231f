"""`twistd relaybus-worker`: request handlers served from RabbitMQ."""

from twisted.application.service import IService

from relaybus.options import WorkerOptions as Options
from relaybus.service import WorkerService


def makeService(options: Options) -> IService:
    return WorkerService(options.config)


__all__ = ["Options", "makeService"]
