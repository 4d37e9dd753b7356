"""Development PKI: every CA, server and client certificate the native stack needs.

Set-up and rotation tooling and its CLI (the running service uses only
``ca.CertificateAuthority``).

Two separate trust chains, so that an agent certificate can never authenticate
the internal edge->API hop and the edge's client certificate can never pass as
an agent:

* agents:   root-ca -> issuing-ca -> agent certificates and the edge's server certificate
* internal: internal-ca -> api-server (server) and edge-client (nginx's client certificate)

The root's key lives only in the offline folder (by default ``pki-offline`` beside
the PKI folder), which no running service reads: it is used to sign issuing CAs
(``init``, ``rotate-issuing``) and nothing else. The PKI folder that services
read holds the root's certificate but never its key.

Keys are ECDSA P-256 and stored unencrypted (mode 0600): this is for laptops and
tests, not for production, where the issuing CA key lives in a KMS and the root
key in an offline HSM.

CLI::

    python -m services.gateway_auth.pki init --dir .run/pki [--offline-dir .run/pki-offline]
    python -m services.gateway_auth.pki rotate-issuing --dir .run/pki [--offline-dir DIR]
    python -m services.gateway_auth.pki issue-agent --dir .run/pki \\
        --customer acme --env prod --agent agent-1 [--days 1] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

# AGENT_VALIDITY is named here too for the tools that issue agent certificates from
# the PKI folder (bench/).
from services.gateway_auth.ca import AGENT_VALIDITY as AGENT_VALIDITY
from services.gateway_auth.ca import (
    SERVER_VALIDITY,
    SPIFFE_TRUST_DOMAIN,
    CertificateAuthority,
    IssuedCertificate,
    cert_pem,
    subject_name,
    write_atomically,
)

ROOT_CA: Final = "root-ca"
ISSUING_CA: Final = "issuing-ca"
INTERNAL_CA: Final = "internal-ca"
EDGE_SERVER: Final = "edge-server"
API_SERVER: Final = "api-server"
EDGE_CLIENT: Final = "edge-client"
AGENT_CA_BUNDLE: Final = "agent-ca-bundle.pem"
EDGE_SERVER_CHAIN: Final = "edge-server-chain.pem"
EDGE_CLIENT_CN: Final = "fleetplane-edge"
OFFLINE_DIR_NAME: Final = "pki-offline"
RETIRED_DIR_NAME: Final = "retired"
# Server certificates this close to expiry are reissued by `init`, so a long-lived
# checkout does not break one morning.
RENEW_BEFORE: Final = timedelta(days=30)

_LOCAL_NAMES: Final[tuple[x509.GeneralName, ...]] = (
    x509.DNSName("localhost"),
    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    x509.IPAddress(ipaddress.ip_address("::1")),
)


ROOT_CA_NAME: Final = "Fleetplane Dev Root CA"
ISSUING_CA_NAME: Final = "Fleetplane Dev Agent Issuing CA"
INTERNAL_CA_NAME: Final = "Fleetplane Dev Internal CA"


def _signed_by(certificate: x509.Certificate, issuer: CertificateAuthority) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer.certificate)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _write_if_changed(path: Path, data: bytes, written: list[Path]) -> None:
    if not path.exists() or path.read_bytes() != data:
        write_atomically(path, data)
        written.append(path)


def _ensure_ca(
    pki_dir: Path,
    name: str,
    make: Callable[[], CertificateAuthority],
    *,
    parent: CertificateAuthority | None,
    renew: bool,
    written: list[Path],
) -> tuple[CertificateAuthority, bool]:
    """Load CA `name`, or create it when missing, forced or no longer signed by `parent`."""
    cert_path = pki_dir / f"{name}.pem"
    if not renew and cert_path.exists() and cert_path.with_suffix(".key").exists():
        ca = CertificateAuthority.load(cert_path)
        if parent is None or _signed_by(ca.certificate, parent):
            return ca, False
    ca = make()
    ca.save(pki_dir, name)
    written += [cert_path.with_suffix(".key"), cert_path]
    return ca, True


def _leaf_is_current(cert_path: Path, key_path: Path, ca: CertificateAuthority) -> bool:
    if not (cert_path.exists() and key_path.exists()):
        return False
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    return (
        key.public_key() == certificate.public_key()
        and _signed_by(certificate, ca)
        and certificate.not_valid_after_utc - RENEW_BEFORE > datetime.now(UTC)
    )


def _ensure_leaf(
    pki_dir: Path,
    name: str,
    ca: CertificateAuthority,
    make: Callable[[], IssuedCertificate],
    *,
    renew: bool,
    written: list[Path],
) -> bytes:
    """Issue leaf `name` unless a current one signed by `ca` exists; returns its PEM."""
    cert_path, key_path = pki_dir / f"{name}.pem", pki_dir / f"{name}.key"
    if renew or not _leaf_is_current(cert_path, key_path, ca):
        issued = make()
        write_atomically(key_path, issued.private_key_pem, private=True)
        write_atomically(cert_path, issued.certificate_pem)
        written += [key_path, cert_path]
    return cert_path.read_bytes()


def _local_server(ca: CertificateAuthority) -> Callable[[], IssuedCertificate]:
    """Issues a server certificate for this machine's loopback names."""
    return partial(
        ca.issue,
        subject_name("localhost"),
        names=_LOCAL_NAMES,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        valid_for=SERVER_VALIDITY,
    )


def _offline_dir(pki_dir: Path, offline_dir: Path | None) -> Path:
    return offline_dir if offline_dir is not None else pki_dir.parent / OFFLINE_DIR_NAME


def _move_root_key_offline(pki_dir: Path, offline_dir: Path, written: list[Path]) -> None:
    """Older layouts kept the root key beside the service files: move it out."""
    stray = pki_dir / f"{ROOT_CA}.key"
    if not stray.exists():
        return
    target = offline_dir / f"{ROOT_CA}.key"
    if target.exists():
        stray.unlink()
    else:
        write_atomically(target, stray.read_bytes(), private=True)
        write_atomically(offline_dir / f"{ROOT_CA}.pem", (pki_dir / f"{ROOT_CA}.pem").read_bytes())
        stray.unlink()
        written.append(target)


def retired_issuing_cas(pki_dir: Path) -> list[x509.Certificate]:
    """Previous issuing CAs kept (certificates only) so their agents still verify in a window."""
    folder = pki_dir / RETIRED_DIR_NAME
    if not folder.is_dir():
        return []
    now = datetime.now(UTC)
    found = []
    for path in sorted(folder.glob(f"{ISSUING_CA}-*.pem")):
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
        if certificate.not_valid_after_utc > now:
            found.append(certificate)
    return found


def _write_agent_bundle(
    pki_dir: Path, issuing: CertificateAuthority, root_pem: bytes, written: list[Path]
) -> None:
    # nginx verifies agents against this bundle (ssl_verify_depth 2: agent, issuing,
    # root). Retired issuing CAs stay in it for their window; gateway_auth's edge
    # check refuses them once the window closed, so no nginx reload is needed.
    retired = b"".join(cert_pem(c) for c in retired_issuing_cas(pki_dir))
    _write_if_changed(
        pki_dir / AGENT_CA_BUNDLE, issuing.certificate_pem + retired + root_pem, written
    )


def init_pki(pki_dir: Path, *, offline_dir: Path | None = None, force: bool = False) -> list[Path]:
    """Create whatever is missing or stale in `pki_dir`, keep the rest; return the files written.

    The root CA (certificate and key) is made in `offline_dir` (default: the
    folder ``pki-offline`` beside `pki_dir`); only its certificate is copied into
    `pki_dir`. A CA that is (re)created takes everything it signs with it, so the
    folder never mixes two generations of one CA. `force` recreates everything.
    """
    offline = _offline_dir(pki_dir, offline_dir)
    pki_dir.mkdir(parents=True, exist_ok=True)
    offline.mkdir(parents=True, exist_ok=True)
    os.chmod(offline, 0o700)
    written: list[Path] = []
    _move_root_key_offline(pki_dir, offline, written)

    ensure_ca = partial(_ensure_ca, written=written)
    make_root = partial(CertificateAuthority.create_root, ROOT_CA_NAME, path_length=1)
    root, new_root = ensure_ca(offline, ROOT_CA, make_root, parent=None, renew=force)
    _write_if_changed(pki_dir / f"{ROOT_CA}.pem", root.certificate_pem, written)
    make_issuing = partial(
        root.create_intermediate, ISSUING_CA_NAME, permitted_uri_hosts=[SPIFFE_TRUST_DOMAIN]
    )
    renew = force or new_root
    issuing, new_issuing = ensure_ca(pki_dir, ISSUING_CA, make_issuing, parent=root, renew=renew)
    if new_root:
        # Issuing CAs of the previous root cannot chain to the new one.
        for stale in (pki_dir / RETIRED_DIR_NAME).glob(f"{ISSUING_CA}-*.pem"):
            stale.unlink()
    _write_agent_bundle(pki_dir, issuing, root.certificate_pem, written)
    edge_server = _ensure_leaf(
        pki_dir,
        EDGE_SERVER,
        issuing,
        _local_server(issuing),
        renew=force or new_issuing,
        written=written,
    )
    # Agents trust only root-ca.pem, so the edge must send the issuing CA along.
    _write_if_changed(pki_dir / EDGE_SERVER_CHAIN, edge_server + issuing.certificate_pem, written)

    make_internal = partial(CertificateAuthority.create_root, INTERNAL_CA_NAME, path_length=0)
    internal, new_internal = ensure_ca(
        pki_dir, INTERNAL_CA, make_internal, parent=None, renew=force
    )
    edge_client = partial(
        internal.issue,
        subject_name(EDGE_CLIENT_CN),
        names=(),
        usage=ExtendedKeyUsageOID.CLIENT_AUTH,
        valid_for=SERVER_VALIDITY,
    )
    for name, make in ((API_SERVER, _local_server(internal)), (EDGE_CLIENT, edge_client)):
        _ensure_leaf(pki_dir, name, internal, make, renew=force or new_internal, written=written)
    return written


def rotate_issuing_ca(
    pki_dir: Path, *, offline_dir: Path | None = None, now: datetime | None = None
) -> tuple[x509.Certificate, x509.Certificate]:
    """Replace the issuing CA by a new one signed by the offline root; (old, new).

    The old certificate moves to ``retired/`` (its key is deleted: it signs
    nothing any more) and stays in the agent bundle, so agents it issued keep
    working until gateway_auth's window for it closes (``issuers retire``). The
    new CA gets a distinct name, since the edge check tells CAs apart by name.
    """
    offline = _offline_dir(pki_dir, offline_dir)
    root = CertificateAuthority.load(offline / f"{ROOT_CA}.pem")
    old = load_issuing_ca(pki_dir)
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S%fZ")
    new = root.create_intermediate(
        f"{ISSUING_CA_NAME} {stamp}", permitted_uri_hosts=[SPIFFE_TRUST_DOMAIN]
    )
    retired = pki_dir / RETIRED_DIR_NAME
    retired.mkdir(exist_ok=True)
    write_atomically(
        retired / f"{ISSUING_CA}-{old.certificate.serial_number:x}.pem", old.certificate_pem
    )
    new.save(pki_dir, ISSUING_CA)
    _write_agent_bundle(pki_dir, new, root.certificate_pem, [])
    return old.certificate, new.certificate


def load_issuing_ca(pki_dir: Path) -> CertificateAuthority:
    """The CA that signs agent certificates; load it once to issue many."""
    return CertificateAuthority.load(pki_dir / f"{ISSUING_CA}.pem")


def write_agent_certificate(
    ca: CertificateAuthority,
    out_dir: Path,
    customer_id: str,
    environment_id: str,
    agent_id: str,
    *,
    valid_for: timedelta = AGENT_VALIDITY,
) -> tuple[Path, Path]:
    """Issue an agent certificate into `<out_dir>/<customer>.<env>.<agent>.{pem,key}`.

    Ids cannot contain dots, so the file names of two agents never collide.
    """
    issued = ca.issue_agent(customer_id, environment_id, agent_id, valid_for=valid_for)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{customer_id}.{environment_id}.{agent_id}"
    cert_path, key_path = out_dir / f"{stem}.pem", out_dir / f"{stem}.key"
    write_atomically(key_path, issued.private_key_pem, private=True)
    write_atomically(cert_path, issued.certificate_pem)
    return cert_path, key_path


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.gateway_auth.pki", description="Fleetplane development PKI."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    init = commands.add_parser("init", help="create the CAs and service certificates")
    init.add_argument("--dir", type=Path, required=True, help="PKI folder")
    init.add_argument("--offline-dir", type=Path, help="root CA folder (default: pki-offline)")
    init.add_argument("--force", action="store_true", help="recreate everything")

    rotate = commands.add_parser(
        "rotate-issuing", help="replace the issuing CA by a new one signed by the offline root"
    )
    rotate.add_argument("--dir", type=Path, required=True, help="PKI folder")
    rotate.add_argument("--offline-dir", type=Path, help="root CA folder (default: pki-offline)")

    agent = commands.add_parser("issue-agent", help="issue an agent client certificate")
    agent.add_argument("--dir", type=Path, required=True, help="PKI folder (from init)")
    agent.add_argument("--customer", required=True)
    agent.add_argument("--env", required=True)
    agent.add_argument("--agent", required=True)
    agent.add_argument("--days", type=float, default=AGENT_VALIDITY.days, help="validity")
    agent.add_argument("--out-dir", type=Path, help="default: <dir>/agents")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        if args.command == "init":
            written = init_pki(args.dir, offline_dir=args.offline_dir, force=args.force)
            print(
                f"pki: wrote {len(written)} files in {args.dir}" if written else "pki: up to date"
            )
        elif args.command == "rotate-issuing":
            old, new = rotate_issuing_ca(args.dir, offline_dir=args.offline_dir)
            print(f"pki: issuing CA {new.subject.rfc4514_string()} replaces")
            print(f"     {old.subject.rfc4514_string()} (close its window with `issuers retire`)")
        else:
            cert_path, key_path = write_agent_certificate(
                load_issuing_ca(args.dir),
                args.out_dir or args.dir / "agents",
                args.customer,
                args.env,
                args.agent,
                valid_for=timedelta(days=args.days),
            )
            print(cert_path)
            print(key_path)
    except (ValueError, OSError) as error:
        print(f"pki: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
