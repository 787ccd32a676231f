"""`twistd relaybus`: the gateway."""

from twisted.application.service import IService

from relaybus.options import GatewayOptions as Options
from relaybus.service import GatewayService, exitZeroOnSigterm, reloadOnSighup


def makeService(options: Options) -> IService:
    exitZeroOnSigterm()
    reloadOnSighup(options.authorizer)
    return GatewayService(options.config, options.registry, checker=options.checker,
                          authorizer=options.authorizer)


__all__ = ["Options", "makeService"]
