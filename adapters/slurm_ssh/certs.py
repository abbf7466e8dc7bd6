"""The broker as an SSH user CA: short-lived certificates for each POSIX user.

Per connection a fresh Ed25519 key pair is generated and a certificate is
signed for it with the CA key (``ssh_ca_key_file``, any OpenSSH private key
type ``cryptography`` reads: Ed25519, ECDSA, RSA). The certificate names one
principal (the POSIX user), is valid from a little before now (clock skew) for
``validity`` seconds, and carries no extensions (commands do not need a pty).
The login node trusts the CA via ``TrustedUserCAKeys``. Key material is never
logged.
"""

from __future__ import annotations

import io
import secrets
import threading
import time

import paramiko
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import ssh

from broker.adapter import AdapterConfigError

__all__ = ["CertificateAuthority", "load_private_key"]


class CertificateAuthority:
    """Issues user certificates; thread-safe; the CA key is read on first use."""

    def __init__(self, ca_key_file: str, validity_seconds: int, backdate_seconds: int = 60) -> None:
        self._path = ca_key_file
        self._validity = validity_seconds
        self._backdate = backdate_seconds
        self._lock = threading.Lock()
        self._ca: ssh.SSHCertPrivateKeyTypes | None = None

    def _ca_key(self) -> ssh.SSHCertPrivateKeyTypes:
        with self._lock:
            if self._ca is None:
                self._ca = _load_ca(self._path)
            return self._ca

    def issue(self, principal: str) -> paramiko.PKey:
        """A new Ed25519 key with a certificate for ``principal`` loaded on it."""
        user_key = ed25519.Ed25519PrivateKey.generate()
        now = int(time.time())
        cert = (
            ssh.SSHCertificateBuilder()
            .public_key(user_key.public_key())
            .serial(secrets.randbits(64))
            .type(ssh.SSHCertificateType.USER)
            .key_id(f"aifa-broker:{principal}:{now}".encode())
            .valid_principals([principal.encode()])
            .valid_after(now - self._backdate)
            .valid_before(now + self._validity)
            .sign(self._ca_key())
        )
        pem = user_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ).decode("ascii")
        pkey = paramiko.Ed25519Key.from_private_key(io.StringIO(pem))
        pkey.load_certificate(cert.public_bytes().decode("ascii"))
        return pkey


def _load_ca(path: str) -> ssh.SSHCertPrivateKeyTypes:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise AdapterConfigError(
            f"slurm_ssh: cannot read ssh_ca_key_file {path}: {exc.strerror}"
        ) from exc
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise AdapterConfigError(
            f"slurm_ssh: ssh_ca_key_file {path} is not an OpenSSH private key"
        ) from exc
    if not isinstance(
        key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    ):
        raise AdapterConfigError(f"slurm_ssh: unsupported CA key type in {path}")
    return key


def load_private_key(path: str) -> paramiko.PKey:
    """A private key file for ``auth = "key"`` (any type paramiko reads)."""
    try:
        return paramiko.PKey.from_path(path)
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise AdapterConfigError(f"slurm_ssh: cannot load key_file {path}: {exc}") from exc
