"""Consortium CA, SuperLink certificate and SuperNode keys (``fedprog certs [check]``) with ``cryptography``.

Layout written under ``out`` (file names are fixed so the server and site configs can point at them)::

    ca.crt            consortium CA certificate (PEM): every hospital gets it (``--root-certificates``)
    ca.key            CA private key (PEM, 0600): keep offline; needed only to issue a new server certificate
    server.crt        SuperLink TLS certificate (PEM), SANs = the given host names and IP addresses
    server.key        SuperLink TLS private key (PEM, 0600)
    nodes/<site>.key  SuperNode authentication key: EC P-384, OpenSSH format, 0600; goes to that site only
    nodes/<site>.pub  its OpenSSH public key: registered at the SuperLink (``flwr supernode register``)

All keys are EC P-384 (SECP384R1): Flower only accepts EC keys on NIST curves for node authentication and
generates P-384 itself. A hospital that prefers to keep its private key at home runs ``fedprog certs
parts=[nodes] sites=[<its name>]`` locally and sends only the ``.pub`` file to the coordinator.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from omegaconf import DictConfig

logger = logging.getLogger(__name__)

LOOPBACK_HOST = "127.0.0.1"  # always a SAN: the coordinator's own CLI dials the loopback Control API
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
NODES_DIR = "nodes"
PARTS = ("ca", "server", "nodes")
PRIVATE_MODE = 0o600
CURVE = ec.SECP384R1
OPENSSH_PRIVATE_HEADER = b"-----BEGIN OPENSSH PRIVATE KEY-----"


class CertificateError(ValueError):
    """A certificate or key cannot be written or does not pass a check; the message names the file."""


@dataclass(frozen=True)
class CertPaths:
    """Paths of the files of one consortium folder (see the module docstring for the layout)."""

    root: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: dict[str, Path] = field(default_factory=dict)
    node_pubs: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def of(cls, root: str | Path, sites: Iterable[str] = ()) -> CertPaths:
        """Return the layout under ``root`` for the given site names."""
        root = Path(root)
        sites = list(sites)
        return cls(
            root=root,
            ca_cert=root / CA_CERT,
            ca_key=root / CA_KEY,
            server_cert=root / SERVER_CERT,
            server_key=root / SERVER_KEY,
            node_keys={site: root / NODES_DIR / f"{site}.key" for site in sites},
            node_pubs={site: root / NODES_DIR / f"{site}.pub" for site in sites},
        )


# --------------------------------------------------------------------------------------------- writing


def _write(path: Path, data: bytes, *, private: bool, force: bool) -> None:
    """Write ``data`` to ``path``; refuse to overwrite without ``force``; private files get mode 0600."""
    if path.exists() and not force:
        raise CertificateError(
            f"{path} already exists; refusing to overwrite it (pass force=true to replace it)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    mode = PRIVATE_MODE if private else 0o644
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)  # the umask may have removed bits from a public file; private stays 0600


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """Turn host names and IP addresses into subjectAltName entries (IPs as IPAddress, names as DNSName)."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_ca(
    common_name: str, organization: str, *, validity_days: int, now: datetime | None = None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Create a self-signed consortium CA (EC P-384, ``pathlen=0``).

    Parameters
    ----------
    common_name, organization : str
        Subject fields of the CA.
    validity_days : int
        Days from ``now`` until expiry.
    now : datetime, optional
        Start of validity (UTC); defaults to the current time.

    Returns
    -------
    (x509.Certificate, EllipticCurvePrivateKey)
    """
    now = now or datetime.now(UTC)
    key = ec.generate_private_key(CURVE())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return cert, key


def make_server_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: Sequence[str],
    *,
    validity_days: int,
    now: datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Issue the SuperLink TLS certificate for ``hosts`` (DNS names and IP addresses become SANs).

    Parameters
    ----------
    ca_cert, ca_key
        The issuing consortium CA.
    hosts : Sequence[str]
        Names and addresses the SuperNodes use to reach the SuperLink (at least one); ``127.0.0.1`` is
        always added (the loopback Control API that ``fedprog server enrol|run`` dials).
    validity_days : int
        Days from ``now`` until expiry (capped at the CA's expiry).
    now : datetime, optional
        Start of validity (UTC).

    Returns
    -------
    (x509.Certificate, EllipticCurvePrivateKey)
    """
    if not hosts:
        raise CertificateError("server certificate: give at least one host name or IP address (hosts=[...])")
    now = now or datetime.now(UTC)
    key = ec.generate_private_key(CURVE())
    not_after = min(now + timedelta(days=validity_days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName(_san_entries(list(dict.fromkeys([*hosts, LOOPBACK_HOST])))),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return cert, key


def write_node_key(site: str, directory: str | Path, *, force: bool = False) -> tuple[Path, Path]:
    """Generate one SuperNode authentication key pair (EC P-384, OpenSSH private + public key).

    Parameters
    ----------
    site : str
        Site name; files are ``<directory>/<site>.key`` (0600) and ``<directory>/<site>.pub``.
    directory : str or Path
        Output folder (created).
    force : bool
        Replace existing files.

    Returns
    -------
    (Path, Path)
        Private and public key paths.
    """
    directory = Path(directory)
    private_path, public_path = directory / f"{site}.key", directory / f"{site}.pub"
    for path in (private_path, public_path):
        if path.exists() and not force:
            raise CertificateError(
                f"{path} already exists; refusing to overwrite it (pass force=true to replace it)"
            )
    key = ec.generate_private_key(CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(private_path, private, private=True, force=force)
    _write(public_path, public + f" fedprog-{site}\n".encode(), private=False, force=force)
    return private_path, public_path


def make_certificates(
    out: str | Path,
    hosts: Sequence[str],
    sites: Sequence[str],
    *,
    parts: Sequence[str] = PARTS,
    validity_days: int = 365,
    ca_validity_days: int = 1825,
    ca_common_name: str = "fedprog consortium CA",
    organization: str = "fedprog consortium",
    force: bool = False,
    now: datetime | None = None,
) -> CertPaths:
    """Write the consortium CA, the SuperLink certificate and one node key pair per site.

    Parameters
    ----------
    out : str or Path
        Output folder.
    hosts : Sequence[str]
        SuperLink host names / IP addresses (server certificate SANs).
    sites : Sequence[str]
        Site names; one node key pair each.
    parts : Sequence[str]
        Subset of ``("ca", "server", "nodes")``. Without ``"ca"`` the server certificate is issued by the
        existing ``out/ca.crt`` + ``out/ca.key`` (certificate renewal).
    validity_days, ca_validity_days : int
        Validity of the server certificate and of the CA, in days.
    ca_common_name, organization : str
        CA subject.
    force : bool
        Overwrite existing files; otherwise an existing file is an error naming it (checked before anything
        is written).
    now : datetime, optional
        Start of validity (UTC); for tests.

    Returns
    -------
    CertPaths
    """
    _check_request(sites, parts, validity_days, ca_validity_days)
    paths = CertPaths.of(out, sites)
    _refuse_overwrite(paths, parts, force)
    ca_cert = ca_key = None
    if "ca" in parts:
        ca_cert, ca_key = make_ca(ca_common_name, organization, validity_days=ca_validity_days, now=now)
        _write_pair(paths.ca_cert, paths.ca_key, ca_cert, ca_key, force=force)
        logger.info("wrote consortium CA %s (valid %d days)", paths.ca_cert, ca_validity_days)
    if "server" in parts:
        if ca_cert is None:
            ca_cert, ca_key = _load_ca(paths)
        assert ca_key is not None
        cert, key = make_server_cert(ca_cert, ca_key, list(hosts), validity_days=validity_days, now=now)
        _write_pair(paths.server_cert, paths.server_key, cert, key, force=force)
        logger.info("wrote SuperLink certificate %s for %s", paths.server_cert, list(hosts))
    if "nodes" in parts:
        for site in sites:
            write_node_key(site, paths.root / NODES_DIR, force=force)
        logger.info("wrote %d node key pair(s) under %s", len(sites), paths.root / NODES_DIR)
    return paths


def _check_request(
    sites: Sequence[str], parts: Sequence[str], validity_days: int, ca_validity_days: int
) -> None:
    """Raise :class:`CertificateError` on an unknown part, a non-positive validity or a repeated site."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise CertificateError(f"certs: unknown part(s) {unknown}; choose from {list(PARTS)}")
    if validity_days <= 0 or ca_validity_days <= 0:
        raise CertificateError(
            f"certs: validity_days ({validity_days}) and ca_validity_days ({ca_validity_days}) "
            "must be positive"
        )
    duplicates = sorted({site for site in sites if list(sites).count(site) > 1})
    if duplicates:
        raise CertificateError(f"certs: site name(s) {duplicates} given more than once")


def _refuse_overwrite(paths: CertPaths, parts: Sequence[str], force: bool) -> None:
    """Without ``force``, raise naming every file of ``parts`` that already exists (before writing any)."""
    targets: list[Path] = []
    if "ca" in parts:
        targets += [paths.ca_cert, paths.ca_key]
    if "server" in parts:
        targets += [paths.server_cert, paths.server_key]
    if "nodes" in parts:
        targets += [*paths.node_keys.values(), *paths.node_pubs.values()]
    existing = [str(path) for path in targets if path.exists()]
    if existing and not force:
        raise CertificateError(
            f"refusing to overwrite existing file(s): {', '.join(existing)} (pass force=true to replace them)"
        )


def _write_pair(
    cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey, *, force: bool
) -> None:
    """Write a certificate (PEM) and its private key (PEM, owner-only)."""
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False, force=force)
    _write(key_path, _pem_private(key), private=True, force=force)


def _load_ca(paths: CertPaths) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load the existing CA certificate and key (for issuing a server certificate without a new CA)."""
    for path in (paths.ca_cert, paths.ca_key):
        if not path.is_file():
            raise CertificateError(
                f"{path} is missing: issuing a server certificate needs the CA (add parts=[ca])"
            )
    cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{paths.ca_key}: the CA key must be an EC key, found {type(key).__name__}")
    return cert, key


# --------------------------------------------------------------------------------------------- checking


def _load_cert(path: Path, problems: list[str]) -> x509.Certificate | None:
    if not path.is_file():
        problems.append(f"{path}: missing")
        return None
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as error:
        problems.append(f"{path}: not a PEM certificate ({error})")
        return None


def _check_validity(
    path: Path, cert: x509.Certificate, now: datetime, warn_days: int, problems: list[str]
) -> None:
    if now < cert.not_valid_before_utc:
        problems.append(f"{path}: not valid yet (valid from {cert.not_valid_before_utc.isoformat()})")
    elif now > cert.not_valid_after_utc:
        problems.append(f"{path}: expired on {cert.not_valid_after_utc.isoformat()}")
    elif cert.not_valid_after_utc - now < timedelta(days=warn_days):
        logger.warning(
            "%s expires on %s (in under %d days)", path, cert.not_valid_after_utc.isoformat(), warn_days
        )


def _check_private_mode(path: Path, problems: list[str]) -> None:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        problems.append(
            f"{path}: private key is readable by group/others (mode {mode:o}); run chmod 600 {path}"
        )


def _is_p384(key: object) -> bool:
    return isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and isinstance(
        key.curve, CURVE
    )


def _describe_key(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    return type(key).__name__.lstrip("_")


def check_node_key(private_path: Path | None, public_path: Path | None) -> list[str]:
    """Check one SuperNode key pair: OpenSSH formats, EC P-384, 0600 private key, private matches public.

    Parameters
    ----------
    private_path, public_path : Path or None
        Either may be None (a coordinator usually holds only the ``.pub``; a hospital only its ``.key``).

    Returns
    -------
    list[str]
        One message per problem (empty when fine).
    """
    problems: list[str] = []
    private_public = None
    if private_path is not None:
        if not private_path.is_file():
            problems.append(f"{private_path}: missing")
        else:
            data = private_path.read_bytes()
            if not data.lstrip().startswith(OPENSSH_PRIVATE_HEADER):
                problems.append(
                    f"{private_path}: not an OpenSSH private key (Flower needs the OpenSSH format)"
                )
            else:
                try:
                    key = serialization.load_ssh_private_key(data, password=None)
                except (ValueError, UnsupportedAlgorithm, TypeError) as error:
                    problems.append(f"{private_path}: unreadable OpenSSH private key ({error})")
                else:
                    if not _is_p384(key):
                        problems.append(
                            f"{private_path}: node key is {_describe_key(key)}; Flower node authentication "
                            f"needs EC P-384 (secp384r1)"
                        )
                    else:
                        private_public = key.public_key()  # type: ignore[union-attr]
            _check_private_mode(private_path, problems)
    if public_path is not None:
        if not public_path.is_file():
            problems.append(f"{public_path}: missing")
        else:
            try:
                public = serialization.load_ssh_public_key(public_path.read_bytes())
            except (ValueError, UnsupportedAlgorithm) as error:
                problems.append(f"{public_path}: not an OpenSSH public key ({error})")
            else:
                if not _is_p384(public):
                    problems.append(
                        f"{public_path}: node public key is {_describe_key(public)}; "
                        "Flower node authentication "
                        f"needs EC P-384 (secp384r1)"
                    )
                elif private_public is not None and private_public != public:
                    problems.append(f"{public_path}: does not match the private key {private_path}")
    return problems


def check_certificates(
    directory: str | Path,
    hosts: Sequence[str] = (),
    sites: Sequence[str] | None = None,
    *,
    expiry_warning_days: int = 30,
    now: datetime | None = None,
) -> list[str]:
    """Check a consortium folder and return every problem found (empty list = all good).

    Checks: the CA is a valid CA certificate; the server certificate is signed by that CA, is currently valid,
    covers every host in ``hosts`` (DNS or IP SAN) and matches ``server.key``; node keys are EC P-384 in
    OpenSSH format, private keys are 0600 and match their ``.pub``.

    Parameters
    ----------
    directory : str or Path
        Folder written by :func:`make_certificates`.
    hosts : Sequence[str]
        Host names / IPs the SuperNodes will use for the SuperLink.
    sites : Sequence[str], optional
        Sites whose key pairs must be present; default: every ``nodes/*.key`` / ``*.pub`` found.
    expiry_warning_days : int
        Log a warning (not an error) when a certificate expires within this many days.
    now : datetime, optional
        Reference time (UTC); for tests.

    Returns
    -------
    list[str]
        One message per problem, each naming its file.
    """
    now = now or datetime.now(UTC)
    root = Path(directory)
    if not root.is_dir():
        return [f"{root}: certificate folder does not exist"]
    if sites is None:
        found = sorted(
            {path.stem for path in (root / NODES_DIR).glob("*") if path.suffix in {".key", ".pub"}}
        )
        sites = found
    paths = CertPaths.of(root, sites)
    problems: list[str] = []

    ca = _load_cert(paths.ca_cert, problems)
    if ca is not None:
        _check_validity(paths.ca_cert, ca, now, expiry_warning_days, problems)
        try:
            constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
            if not constraints.ca:
                problems.append(f"{paths.ca_cert}: not a CA certificate (basicConstraints CA=false)")
        except x509.ExtensionNotFound:
            problems.append(f"{paths.ca_cert}: no basicConstraints extension, so it is not a CA certificate")

    server = _load_cert(paths.server_cert, problems)
    if server is not None:
        _check_validity(paths.server_cert, server, now, expiry_warning_days, problems)
        if ca is not None:
            try:
                server.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature) as error:
                problems.append(
                    f"{paths.server_cert}: not signed by the CA {paths.ca_cert} ({error or 'bad signature'})"
                )
        problems += _check_hosts(paths.server_cert, server, hosts)
        problems += _check_server_key(paths.server_key, server)

    for site in sites:
        problems += check_node_key(paths.node_keys[site], paths.node_pubs[site])
    return problems


def check_server_files(
    ca_path: str | Path, cert_path: str | Path, key_path: str | Path, hosts: Sequence[str] = ()
) -> list[str]:
    """Check the SuperLink's own TLS files (as named in its config): every problem, each naming its file.

    The CA must be a readable PEM certificate; the server certificate must be signed by it, currently valid
    and cover ``hosts``; the key must be an unencrypted PEM key that matches the certificate, mode 0600.
    """
    problems: list[str] = []
    ca = _load_cert(Path(ca_path), problems)
    cert = _load_cert(Path(cert_path), problems)
    if cert is None:
        return problems
    _check_validity(Path(cert_path), cert, datetime.now(UTC), 0, problems)
    if ca is not None:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            problems.append(
                f"{cert_path}: not signed by the CA {ca_path} (wrong CA file, or a certificate of another "
                "consortium)"
            )
    problems += _check_hosts(Path(cert_path), cert, hosts)
    problems += _check_server_key(Path(key_path), cert, cert_path=Path(cert_path))
    return problems


def check_ca_file(ca_path: str | Path) -> list[str]:
    """Check that ``ca_path`` is a readable PEM CA certificate (what a SuperNode passes to Flower)."""
    problems: list[str] = []
    ca = _load_cert(Path(ca_path), problems)
    if ca is not None:
        try:
            if not ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
                problems.append(f"{ca_path}: not a CA certificate (basicConstraints CA=false)")
        except x509.ExtensionNotFound:
            problems.append(f"{ca_path}: no basicConstraints extension, so it is not a CA certificate")
    return problems


def _check_hosts(path: Path, cert: x509.Certificate, hosts: Sequence[str]) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [f"{path}: no subjectAltName extension (clients match host names only against SANs)"]
    dns = {name.lower() for name in san.get_values_for_type(x509.DNSName)}
    ips = set(san.get_values_for_type(x509.IPAddress))
    problems = []
    for host in hosts:
        try:
            covered = ipaddress.ip_address(host) in ips
        except ValueError:
            covered = host.lower() in dns
        if not covered:
            names = sorted(dns) + sorted(str(ip) for ip in ips)
            problems.append(f"{path}: host {host!r} is not in the certificate's subjectAltName {names}")
    return problems


def _check_server_key(path: Path, cert: x509.Certificate, *, cert_path: Path | None = None) -> list[str]:
    if not path.is_file():
        return [f"{path}: missing"]
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as error:
        return [f"{path}: not an unencrypted PEM private key ({error})"]
    problems: list[str] = []
    _check_private_mode(path, problems)
    if key.public_key() != cert.public_key():
        problems.append(f"{path}: does not match the certificate {cert_path or path.with_name(SERVER_CERT)}")
    return problems


# --------------------------------------------------------------------------------------------- CLI


def main(cfg: DictConfig) -> int:
    """``fedprog certs out=DIR hosts=[...] sites=[...]``: write the CA, server certificate and node keys.

    Parameters
    ----------
    cfg : DictConfig
        Composed ``configs/certs.yaml``.

    Returns
    -------
    int
        0 on success, 1 when a file would be overwritten or an argument is wrong (message printed).
    """
    try:
        paths = make_certificates(
            cfg.out,
            list(cfg.hosts),
            list(cfg.sites),
            parts=list(cfg.parts),
            validity_days=int(cfg.validity_days),
            ca_validity_days=int(cfg.ca_validity_days),
            ca_common_name=str(cfg.ca_common_name),
            organization=str(cfg.organization),
            force=bool(cfg.force),
        )
    except CertificateError as error:
        print(f"fedprog certs: {error}")
        return 1
    print(f"certificates written to {paths.root}:")
    for part, files in (
        ("ca", [paths.ca_cert, paths.ca_key]),
        ("server", [paths.server_cert, paths.server_key]),
        ("nodes", [*paths.node_keys.values(), *paths.node_pubs.values()]),
    ):
        if part in cfg.parts:
            print("  " + "\n  ".join(str(path) for path in files))
    print(f"keep {paths.ca_key} offline; send each site its nodes/<site>.key and {paths.ca_cert}")
    return 0


def check_main(cfg: DictConfig) -> int:
    """``fedprog certs check dir=DIR hosts=[...]``: print every problem; exit 1 when there is any.

    Parameters
    ----------
    cfg : DictConfig
        Composed ``configs/certs.yaml`` (``dir``, ``hosts``, ``check_sites``, ``expiry_warning_days``).

    Returns
    -------
    int
        0 when every check passes, 1 otherwise.
    """
    sites = cfg.get("check_sites")
    problems = check_certificates(
        cfg.dir,
        list(cfg.hosts),
        None if sites is None else list(sites),
        expiry_warning_days=int(cfg.expiry_warning_days),
    )
    if problems:
        print(f"fedprog certs check {cfg.dir}: {len(problems)} problem(s)")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    print(f"fedprog certs check {cfg.dir}: OK (chain, validity, hosts {list(cfg.hosts)}, key formats)")
    return 0
