"""`twistd relaybus`: the gateway."""

from twisted.application.service import IService

from relaybus.options import GatewayOptions as Options
from relaybus.service import GatewayService, exitZeroOnSigterm, reloadOnSighup, tuneGarbageCollector


def makeService(options: Options) -> IService:
    exitZeroOnSigterm()
    tuneGarbageCollector()
    reloadOnSighup(options.authorizer)
    return GatewayService(options.config, options.registry, checker=options.checker,
                          authorizer=options.authorizer)


__all__ = ["Options", "makeService"]
