"""Credentials for a secure Flower deployment: a TLS CA and SuperLink certificate, SuperNode key pairs.

``python -m flora.deploy_keys tls DIR --host 127.0.0.1 --host 10.77.0.1`` writes ``ca.crt``, ``ca.key``,
``server.pem`` and ``server.key`` (the SuperLink's certificate, signed by the CA, valid for every
``--host`` as an IP or DNS subject alternative name). ``python -m flora.deploy_keys node DIR NAME``
writes ``NAME`` and ``NAME.pub``: an OpenSSH ECDSA P-384 key pair, the form Flower's SuperNode
authentication reads (``--auth-supernode-private-key``, ``flwr supernode register NAME.pub``).
Files that exist are left as they are, so a deployment keeps its identity across restarts; an existing
private key that others could read is refused (:class:`KeyFileError`), never silently reused. Private keys
are created with mode 0600 and renamed into place, so they are never readable by others, not even briefly.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import secrets
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365


class KeyFileError(ValueError):
    """A private key file that must not be used as it is (readable by others, a link); names the file."""


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only, atomically: the bytes go to a new temporary file
    created with mode 0600 (``O_EXCL``: never an existing file, never through a link) and fsynced, then it
    is renamed over ``path``. The key is never on disk with wider permissions, nor half-written."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        os.fchmod(fd, 0o600)  # exactly 0600 whatever the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)


def check_private(path: Path) -> Path:
    """``path`` if it is a regular file (not a link) that only its owner can read or write; else
    :class:`KeyFileError` saying how to fix it (an existing key is never silently reused)."""
    if path.is_symlink() or not path.is_file():
        raise KeyFileError(f"{path}: a private key must be a regular file, not a link or directory")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyFileError(f"{path}: private key has mode {mode:04o}, readable or writable by others; expected "
                           f"0600 (run `chmod 600 {path}` if it was never exposed, else delete it to make a new one)")
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def write_tls(directory: str | Path, hosts: list[str]) -> dict[str, Path]:
    """CA + server certificate for ``hosts`` in ``directory`` (kept if present); returns the four paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / name for name in ("ca.crt", "ca.key", "server.pem", "server.key")}
    if all(p.is_file() for p in paths.values()):
        check_private(paths["ca.key"])
        check_private(paths["server.key"])
        return paths
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=VALID_DAYS)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "FLoRA deployment CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
                   .issuer_name(ca_name).public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .sign(ca_key, hashes.SHA384()))
    paths["ca.crt"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths["ca.key"], _pem_key(ca_key))
    paths["server.pem"].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths["server.key"], _pem_key(server_key))
    return paths


def write_node_key(directory: str | Path, name: str) -> tuple[Path, Path]:
    """OpenSSH ECDSA P-384 key pair ``directory/name`` and ``directory/name.pub`` (kept if present)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private, public = directory / name, directory / f"{name}.pub"
    if private.is_file() and public.is_file():
        return check_private(private), public
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b" flora-" +
                       name.encode() + b"\n")
    return private, public


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flora.deploy_keys", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    tls = commands.add_parser("tls", help="CA and SuperLink certificate")
    tls.add_argument("directory")
    tls.add_argument("--host", action="append", required=True, help="IP or DNS name the SuperLink is reached at")
    node = commands.add_parser("node", help="a SuperNode's authentication key pair")
    node.add_argument("directory")
    node.add_argument("name")
    args = parser.parse_args(argv)
    try:
        if args.command == "tls":
            for path in write_tls(args.directory, args.host).values():
                print(path)
        else:
            print(*write_node_key(args.directory, args.name), sep="\n")
    except KeyFileError as exc:
        raise SystemExit(f"flora.deploy_keys: error: {exc}") from None


if __name__ == "__main__":
    main()
