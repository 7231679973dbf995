from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from omegaconf import OmegaConf

from fedprog.config import load_config
from fedprog.deploy.certs import (
    CertificateError,
    check_certificates,
    check_main,
    main,
    make_certificates,
)

HOSTS = ["localhost", "127.0.0.1"]
SITES = ["blca", "brca"]


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs") / "consortium"
    make_certificates(out, HOSTS, SITES, validity_days=30)
    return out


@pytest.fixture
def copy(consortium: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(consortium, target)
    return target


def test_make_writes_layout_and_check_passes(consortium: Path) -> None:
    for name in ("ca.crt", "ca.key", "server.crt", "server.key", "nodes/blca.key", "nodes/brca.pub"):
        assert (consortium / name).is_file(), name
    for private in ("ca.key", "server.key", "nodes/blca.key", "nodes/brca.key"):
        assert (consortium / private).stat().st_mode & 0o777 == 0o600, private
    node = serialization.load_ssh_private_key((consortium / "nodes/blca.key").read_bytes(), None)
    assert isinstance(node, ec.EllipticCurvePrivateKey) and node.curve.name == "secp384r1"
    assert (consortium / "nodes/blca.key").read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert (consortium / "nodes/blca.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert check_certificates(consortium, HOSTS, SITES) == []


def test_overwrite_refused_then_forced(copy: Path) -> None:
    before = (copy / "ca.crt").read_bytes()
    with pytest.raises(CertificateError, match=r"ca\.crt.*force=true"):
        make_certificates(copy, HOSTS, SITES)
    assert (copy / "ca.crt").read_bytes() == before  # nothing half-written
    make_certificates(copy, HOSTS, SITES, force=True)
    assert (copy / "ca.crt").read_bytes() != before
    assert check_certificates(copy, HOSTS, SITES) == []


def test_new_site_key_and_server_renewal_keep_the_ca(copy: Path) -> None:
    ca = (copy / "ca.crt").read_bytes()
    make_certificates(copy, ["fl.example.org"], ["hnsc"], parts=["nodes"])
    make_certificates(copy, ["fl.example.org", "10.1.2.3"], [], parts=["server"], force=True)
    assert (copy / "ca.crt").read_bytes() == ca
    assert check_certificates(copy, ["fl.example.org", "10.1.2.3"], ["blca", "hnsc"]) == []


def test_expired_and_not_yet_valid(tmp_path: Path) -> None:
    old = tmp_path / "old"
    make_certificates(old, HOSTS, SITES, validity_days=10, now=datetime.now(UTC) - timedelta(days=40))
    problems = check_certificates(old, HOSTS)
    assert len(problems) == 1 and "server.crt: expired on" in problems[0]
    future = check_certificates(old, HOSTS, now=datetime.now(UTC) - timedelta(days=400))
    assert any("not valid yet" in problem for problem in future)


def test_wrong_host(consortium: Path) -> None:
    problems = check_certificates(consortium, ["fl.hospital.org", "10.0.0.7", "127.0.0.1"])
    assert len(problems) == 2
    assert "host 'fl.hospital.org' is not in the certificate's subjectAltName" in problems[0]
    assert "'10.0.0.7'" in problems[1]


def test_wrong_ca(copy: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    make_certificates(other, HOSTS, [])
    shutil.copy(other / "ca.crt", copy / "ca.crt")
    problems = check_certificates(copy, HOSTS, SITES)
    assert len(problems) == 1 and "server.crt: not signed by the CA" in problems[0]


def test_server_key_mismatch(copy: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    make_certificates(other, HOSTS, [])
    shutil.copy(other / "server.key", copy / "server.key")
    problems = check_certificates(copy, HOSTS, SITES)
    assert problems == [f"{copy / 'server.key'}: does not match the certificate {copy / 'server.crt'}"]


def _write_ssh_key(path: Path, key: object) -> None:
    path.write_bytes(
        key.private_bytes(  # type: ignore[attr-defined]
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)
    public = key.public_key().public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    path.with_suffix(".pub").write_bytes(public + b"\n")


@pytest.mark.parametrize(
    ("make_key", "found"),
    [
        (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), "RSAPrivateKey"),
        (ed25519.Ed25519PrivateKey.generate, "Ed25519PrivateKey"),
        (lambda: ec.generate_private_key(ec.SECP256R1()), "EC secp256r1"),
    ],
    ids=["rsa", "ed25519", "p256"],
)
def test_wrong_node_key_types(copy: Path, make_key, found: str) -> None:  # noqa: ANN001
    _write_ssh_key(copy / "nodes" / "blca.key", make_key())
    problems = check_certificates(copy, HOSTS, ["blca"])
    assert len(problems) == 2, problems  # private and public key both named
    assert f"blca.key: node key is {found}" in problems[0] and "P-384" in problems[0]
    assert "blca.pub: node public key is" in problems[1]


def test_pem_node_key_permissions_and_mismatch(copy: Path) -> None:
    key = serialization.load_ssh_private_key((copy / "nodes/blca.key").read_bytes(), None)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (copy / "nodes/blca.key").write_bytes(pem)
    (copy / "nodes/brca.key").chmod(0o644)
    shutil.copy(copy / "nodes/blca.pub", copy / "nodes/brca.pub")
    problems = check_certificates(copy, HOSTS, SITES)
    assert any("blca.key: not an OpenSSH private key" in p for p in problems)
    assert any("brca.key: private key is readable by group/others (mode 644)" in p for p in problems)
    assert any("brca.pub: does not match the private key" in p for p in problems)
    assert len(problems) == 3


def test_missing_files_all_reported(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    problems = check_certificates(tmp_path / "empty", HOSTS, ["blca"])
    assert [p.split(": ")[1] for p in problems] == ["missing"] * 4
    assert check_certificates(tmp_path / "nope", HOSTS) == [
        f"{tmp_path / 'nope'}: certificate folder does not exist"
    ]


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(CertificateError, match="unknown part"):
        make_certificates(tmp_path, HOSTS, SITES, parts=["ca", "crl"])
    with pytest.raises(CertificateError, match="more than once"):
        make_certificates(tmp_path, HOSTS, ["blca", "blca"])
    with pytest.raises(CertificateError, match="at least one host"):
        make_certificates(tmp_path / "x", [], SITES)
    with pytest.raises(CertificateError, match=r"ca\.crt is missing"):
        make_certificates(tmp_path / "y", HOSTS, [], parts=["server"])


def test_cli_entry_points(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    cfg = load_config("certs", [f"out={out}", "sites=[blca]"])
    assert main(cfg) == 0
    assert main(cfg) == 1
    assert "refusing to overwrite" in capsys.readouterr().out
    assert check_main(cfg) == 0
    bad = load_config("certs", [f"dir={out}", "hosts=[elsewhere.org]"])
    assert check_main(bad) == 1
    assert "elsewhere.org" in capsys.readouterr().out
    assert OmegaConf.select(cfg, "validity_days") == 365
