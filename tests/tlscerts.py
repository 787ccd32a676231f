"""Throwaway X.509 material for TLS tests (made with `cryptography`): a CA, a server certificate
for 127.0.0.1/localhost and a client certificate, each signed by the CA, as PEM files."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@attrs.frozen
class PKI:
    caCert: Path
    serverCert: Path
    serverKey: Path
    clientCert: Path
    clientKey: Path


def _name(commonName: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, commonName)])


def _keyPEM(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certPEM(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def makePKI(folder: Path, caName: str = "relaybus test CA") -> PKI:
    """Write ca.pem, server.pem/server.key and client.pem/client.key into `folder`."""
    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1))
    caKey = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name(caName)).issuer_name(_name(caName))
          .public_key(caKey.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(validity[0]).not_valid_after(validity[1])
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(
              digital_signature=True, key_cert_sign=True, crl_sign=True,
              content_commitment=False, key_encipherment=False, data_encipherment=False,
              key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(caKey, hashes.SHA256()))

    def leaf(commonName: str, usage: x509.ObjectIdentifier,
             names: list[x509.GeneralName]) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(_name(commonName))
                   .issuer_name(ca.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(validity[0]).not_valid_after(validity[1])
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return _certPEM(builder.sign(caKey, hashes.SHA256())), _keyPEM(key)

    serverCert, serverKey = leaf("127.0.0.1", ExtendedKeyUsageOID.SERVER_AUTH, [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    clientCert, clientKey = leaf("relaybus-client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    pki = PKI(folder / "ca.pem", folder / "server.pem", folder / "server.key",
                  folder / "client.pem", folder / "client.key")
    pki.caCert.write_bytes(_certPEM(ca))
    pki.serverCert.write_bytes(serverCert)
    pki.serverKey.write_bytes(serverKey)
    pki.clientCert.write_bytes(clientCert)
    pki.clientKey.write_bytes(clientKey)
    return pki
