"""`twistd relaybus`: the gateway."""

from twisted.application.service import IService

from relaybus.options import GatewayOptions as Options
from relaybus.service import GatewayService, exitZeroOnSigterm


def makeService(options: Options) -> IService:
    exitZeroOnSigterm()
    return GatewayService(options.config, options.registry, checker=options.checker)


__all__ = ["Options", "makeService"]
