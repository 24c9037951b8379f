"""Real credentials for the auth tests: a CA, certificates and token/policy files on disk.

Certificates are made with ``cryptography`` (a test dependency): one CA signs the daemon's
certificate (SAN ``localhost`` and IP 127.0.0.1, so clients dial ``127.0.0.1:PORT``) and
client certificates whose subject CN is the identity the policy names.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path

from ckptd.daemon.server.policy import hash_token
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
           ) -> Pem:
    pem = Pem(directory / f"{stem}.crt", directory / f"{stem}.key")
    pem.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return pem


class Authority:
    """A throwaway CA under ``directory`` that issues server and client certificates."""

    def __init__(self, directory: Path, name: str = "ckptd test CA") -> None:
        self.directory = directory
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        self._cert = (
            x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.pem = _write(directory, name.replace(" ", "-"), self._cert, self._key)

    def issue(self, cn: str, *, server: bool = False) -> Pem:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self._cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]), critical=False)
        return _write(self.directory, cn, builder.sign(self._key, hashes.SHA256()), key)


def tokens_file(path: Path, tokens: dict[str, str]) -> Path:
    """Writes a tokens file for ``{token: identity}`` (hashes only, as the daemon wants)."""
    lines = ["# test tokens"] + [f"{hash_token(t)} {who}" for t, who in tokens.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def policy_file(path: Path, *grants: tuple[str, list[str], list[str]]) -> Path:
    """Writes a policy of (identity, runs, scopes) grants."""
    path.write_text(json.dumps({"grants": [
        {"identity": who, "runs": runs, "scopes": scopes} for who, runs, scopes in grants]}))
    return path
