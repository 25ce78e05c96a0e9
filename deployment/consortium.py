"""A consortium on disk: the CA, the SuperLink's TLS files, one folder per site.

```
<consortium>/
  consortium.json          name, SuperLink address, certificate names, the federation's
                           labels when the coordinator gave them (`create --labels`)
  ca/ca.pem                the consortium CA certificate (public: every party gets it)
  ca/ca.key                the CA private key (0600; stays with the coordinator, offline)
  superlink/ca.pem         what `flower-superlink` needs: CA, certificate, key (0600)
  superlink/server.pem
  superlink/server.key
  superlink/Caddyfile      the public listener (Caddy): passes only the Fleet API on
  superlink/start-superlink.sh  the SuperLink on 127.0.0.1 and Caddy in front of it
  superlink/state.db       the SuperLink's state (`--database`): registered nodes, runs
  app-signing/app-signing.key      the coordinator's Ed25519 app-signing key (0600)
  app-signing/app-signing.key.pub  its public key: every site pins it (trusted entities)
  app-signing/signed-apps.jsonl    every app `fedsft submit` signed: FAB SHA-256, signature
  flwr-home/config.toml    the coordinator's `flwr` CLI connection (FLWR_HOME), loopback
  registry.json            site -> node id given by `flwr supernode register`
  sites/<site>/            the site's bundle: copy this folder to the site
    ca.pem                 to verify the SuperLink's certificate
    supernode.key          SuperNode authentication private key, OpenSSH (0600); absent
                           when the site made its own (`fedsft site init`)
    supernode.pub          its public key, OpenSSH; the coordinator registers it
    trusted-entities.yaml  the app-signing public key (`--trusted-entities`)
    start-supernode.sh     the data check, then the `flower-supernode` command line
    bundle.json            the bundle's settings (data path, columns, port), kept on
                           rotation, and the SuperLink address and CA fingerprint
    flwr-home/             the SuperNode's FLWR_HOME (per site: sites may share a host)
```
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import tomli_w

from common.tasks import DEFAULT_TASK, task_info, task_names
from deployment import app_signing, pki, proxy

CONNECTION = "consortium"  # the connection name in flwr-home/config.toml
DEFAULT_PORT = 8000  # the public port (Caddy): the Fleet API only, what SuperNodes reach
# The SuperLink's own port, on 127.0.0.1 only: Flower 1.42 serves Fleet, Control and the
# ServerApp's Runtime API there; the coordinator's `flwr` CLI uses it (9093 was Flower's
# Control API port before 1.42).
LOCAL_PORT = 9093
RUNTIME_PORT = 9094  # flower-supernode --port default: its ClientApp (runtime) API, loopback
# How long a SuperNode keeps retrying after it lost the SuperLink (a restart, a network
# outage) before it exits: a day covers a maintenance window; a supervisor (systemd
# Restart=on-failure) restarts it after that. Flower's own default is to retry forever.
RECONNECT_WAIT_S = 86400.0
PLACEHOLDER_DATA_PATH = "/path/to/site-data.csv"
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class ConsortiumError(RuntimeError):
    """The consortium folder is missing, incomplete or a request does not fit it."""


@dataclass(frozen=True)
class Consortium:
    """Paths and settings of one consortium folder."""

    root: Path

    # --- paths ----------------------------------------------------------------
    @property
    def ca_cert(self) -> Path:
        return self.root / "ca" / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "superlink" / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "superlink" / "server.key"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr-home"

    @property
    def state_db(self) -> Path:
        """The SuperLink's state database: registrations and revocations survive a restart."""
        return self.root / "superlink" / "state.db"

    def site_dir(self, site: str) -> Path:
        return self.root / "sites" / check_site_name(site)

    def site_key(self, site: str) -> Path:
        return self.site_dir(site) / "supernode.key"

    def site_pub(self, site: str) -> Path:
        return self.site_dir(site) / "supernode.pub"

    @property
    def app_signing_key(self) -> Path:
        """The coordinator's app-signing private key (``fedsft submit`` signs with it)."""
        return self.root / "app-signing" / "app-signing.key"

    @property
    def signed_apps_log(self) -> Path:
        """Every app ``fedsft submit`` signed (app_signing.SignedApp, one JSON line each)."""
        return self.root / "app-signing" / "signed-apps.jsonl"

    @property
    def app_index_port(self) -> int:
        """The loopback port where ``fedsft submit`` serves the signed app to the SuperLink."""
        return int(self.settings.get("app-index-port") or app_signing.APP_INDEX_PORT)

    # --- settings ---------------------------------------------------------------
    @property
    def settings(self) -> dict[str, Any]:
        path = self.root / "consortium.json"
        if not path.is_file():
            raise ConsortiumError(f"{self.root} is not a consortium folder (no consortium.json)")
        return json.loads(path.read_text(encoding="utf-8"))

    @property
    def address(self) -> str:
        """The public address (host:port, the proxy) SuperNodes connect to."""
        return str(self.settings["address"])

    @property
    def labels(self) -> tuple[str, ...]:
        """The federation's classes (``fedsft create --labels``, the runs' ``labels``);
        empty when the coordinator did not give them (no key, null or ``[]``).

        Raises
        ------
        ConsortiumError
            consortium.json (which coordinators may edit) holds anything but a list of at
            least 2 distinct non-empty strings without commas (each is one class of the
            runs' comma list ``labels``; distinct as the runs compare them: case-folded
            with ``label-case-fold``).
        """
        value = self.settings.get("labels")
        if value is None or value == []:
            return ()
        allowed = ("a list of at least 2 distinct non-empty class names without commas "
                   "([] for none)")
        if not isinstance(value, list) or not all(
                isinstance(name, str) and name.strip() and "," not in name for name in value):
            raise self._setting_error("labels", value, allowed)
        names = [name.strip() for name in value]
        compared = [name.casefold() for name in names] if self.label_case_fold else names
        if len(names) < 2 or len(set(compared)) != len(compared):
            raise self._setting_error("labels", value, allowed)
        return tuple(names)

    @property
    def label_case_fold(self) -> bool:
        """Whether the runs case-fold string labels (``create --label-case-fold``); false
        when not given. Raises ConsortiumError for a value that is not true or false."""
        value = self.settings.get("label-case-fold", False)
        if not isinstance(value, bool):
            raise self._setting_error("label-case-fold", value, "true or false")
        return value

    def _setting_error(self, key: str, value: Any, allowed: str) -> ConsortiumError:
        return ConsortiumError(f"{self.root / 'consortium.json'}: {key!r} must be "
                               f"{allowed}, got {json.dumps(value)}")

    @property
    def local_address(self) -> str:
        """The SuperLink's own address, 127.0.0.1:port: the Control API, for admins only."""
        return str(self.settings.get("local-address") or f"127.0.0.1:{LOCAL_PORT}")

    @property
    def caddyfile(self) -> Path:
        return self.root / "superlink" / "Caddyfile"

    def sites(self) -> list[str]:
        folder = self.root / "sites"
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def registry(self) -> dict[str, Any]:
        path = self.root / "registry.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}

    def save_registry(self, registry: dict[str, Any]) -> None:
        path = self.root / "registry.json"
        tmp = path.with_name(".registry.json.tmp")
        tmp.write_text(json.dumps(registry, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        tmp.replace(path)


def check_site_name(site: str) -> str:
    """A site name is a folder name: letters, digits, ``_.-``; up to 63 characters."""
    if not _SITE_NAME.match(site):
        raise ConsortiumError(
            f"site name must be letters, digits, '_', '.' or '-' (starting with a letter "
            f"or digit), got {site!r}"
        )
    return site


def create(
    root: Path,
    *,
    name: str,
    names: pki.Names,
    address: str | None = None,
    sites: tuple[str, ...] = (),
    force: bool = False,
    app_index_port: int = app_signing.APP_INDEX_PORT,
    local_port: int = LOCAL_PORT,
    labels: Sequence[str] = (),
    label_case_fold: bool = False,
) -> Consortium:
    """Create a consortium: CA, SuperLink certificate, ``flwr`` connection, site bundles,
    the app-signing key.

    ``address`` is the public one (Caddy, Fleet API only) that site bundles name;
    ``local_port`` the SuperLink's own port on 127.0.0.1, which the coordinator's
    ``flwr-home`` connection uses. ``labels`` (checked by the caller, as the run's
    ``labels``) and ``label_case_fold``: the federation's classes, kept in
    ``consortium.json`` so that each classification bundle's data check refuses labels
    outside them before its SuperNode starts (``site_check_command``). Refuses
    (``pki.KeyExistsError``) when key files exist, unless ``force``; then nothing is
    written.
    """
    c = Consortium(root.resolve())
    for site in sites:
        check_site_name(site)
    existing = [p for p in (c.ca_key, c.server_key, c.app_signing_key) if p.exists()]
    existing += [c.site_key(s) for s in sites if c.site_key(s).exists()]
    if existing and not force:
        raise pki.KeyExistsError(
            f"{', '.join(map(str, existing))} exist(s); use --force to replace the keys"
        )
    host = names.dns[0] if names.dns else names.ips[0]
    # The SuperLink's own SuperExec reaches its API on 127.0.0.1 over TLS (flwr 1.42
    # rewrites a bind-all --host to loopback), so loopback names are always included.
    names = pki.Names(dns=tuple(dict.fromkeys([*names.dns, "localhost"])),
                      ips=tuple(dict.fromkeys([*names.ips, "127.0.0.1"])))
    address = address or f"{host}:{DEFAULT_PORT}"
    port = address.rsplit(":", 1)[1]
    local_address = f"127.0.0.1:{local_port}"
    if port == str(local_port):  # Caddy binds the port on every interface, loopback too
        raise ConsortiumError(f"the public address {address} and the SuperLink's own "
                              f"{local_address} need different ports")
    for sub in ("ca", "superlink", "sites", "flwr-home"):
        (c.root / sub).mkdir(parents=True, exist_ok=True)
    ca_key = pki.new_key()
    ca_cert = pki.make_ca(ca_key, name=name)
    server_key = pki.new_key()
    server_cert = pki.make_server_cert(server_key, ca_cert=ca_cert, ca_key=ca_key, names=names)
    pki.write_private(c.ca_key, pki.key_pem(ca_key), force=force)
    pki.write_public(c.ca_cert, pki.cert_pem(ca_cert), force=True)
    pki.write_private(c.server_key, pki.key_pem(server_key), force=force)
    pki.write_public(c.server_cert, pki.cert_pem(server_cert), force=True)
    pki.write_public(c.root / "superlink" / "ca.pem", pki.cert_pem(ca_cert), force=True)
    settings = {"name": name, "address": address, "local-address": local_address,
                "app-index-port": app_index_port,
                "dns-names": list(names.dns), "ip-addresses": list(names.ips)}
    if labels:
        settings |= {"labels": list(labels), "label-case-fold": label_case_fold}
    (c.root / "consortium.json").write_text(
        json.dumps(settings, indent=2) + "\n", encoding="utf-8"
    )
    # The coordinator's CLI talks to the SuperLink over loopback: through the public
    # address every Control API call is refused.
    write_flwr_config(c.flwr_home, address=local_address, ca_cert=c.ca_cert)
    create_app_signing_key(c, force=force)
    write_superlink_scripts(c, listen_port=int(port))
    for site in sites:
        add_site(c, site, force=force)
    return c


def create_app_signing_key(c: Consortium, *, force: bool = False) -> Path:
    """The coordinator's Ed25519 app-signing key pair; returns the public key file."""
    c.app_signing_key.parent.mkdir(parents=True, exist_ok=True)
    return app_signing.write_signing_key(c.app_signing_key, app_signing.new_signing_key(),
                                         force=force)


def site_trusted_entities(c: Consortium) -> dict[str, str]:
    """What every site's SuperNode trusts to sign apps: the coordinator's signing key."""
    public = app_signing.read_public_key(c.app_signing_key.with_name(
        c.app_signing_key.name + ".pub"))
    return app_signing.trusted_entities(keys=(public,))


def signed_app_index(c: Consortium, app: Path) -> app_signing.AppIndex:
    """The app's FAB signed with the consortium's app-signing key, ready to serve.

    Flower 1.42 carries a signature to SuperNodes only for an app the SuperLink fetches
    from a Hub, so the FAB is served by ``AppIndex`` on the SuperLink's loopback
    (deployment/app_signing.py): submit from the SuperLink's host.
    The signature is added to the signing log (``c.signed_apps_log``), from which
    ``fedsft export --consortium`` names the signature of the app a run ran.
    """
    fab = app_signing.build_fab(app)
    key = app_signing.load_signing_key(c.app_signing_key)
    signature = app_signing.sign_fab(fab, key)
    index = app_signing.AppIndex(fab, (signature,), port=c.app_index_port)
    app_signing.record_signed_app(c.signed_apps_log, app_signing.SignedApp(
        app=index.spec, fab_sha256=index.sha, signature=signature))
    return index


def superlink_signing_env(c: Consortium) -> dict[str, str]:
    """The SuperLink's environment for signed apps: where it fetches them (the app index
    ``fedsft submit`` serves on loopback, in place of Flower Hub)."""
    return {"FLWR_SUPERGRID_API_URL":
            f"http://127.0.0.1:{c.app_index_port}{app_signing.HUB_PATH}"}


def write_flwr_config(flwr_home: Path, *, address: str, ca_cert: Path) -> Path:
    """A ``config.toml`` whose default connection is the SuperLink, over TLS."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(tomli_w.dumps({"superlink": {
        "default": CONNECTION,
        CONNECTION: {"address": address, "root-certificates": str(ca_cert.resolve())},
    }}), encoding="utf-8")
    return path


@dataclass(frozen=True)
class BundleSettings:
    """What a site's ``start-supernode.sh`` is made of besides the keys (``bundle.json``).

    Kept next to the script so that a key rotation (``add-site --force``) rewrites the
    script with the site's real data path instead of a placeholder.
    """

    data_path: str = PLACEHOLDER_DATA_PATH
    # The site's node-config keys for its own file (its task's ``TaskInfo.site_keys``,
    # e.g. text-column), sorted (key, value) pairs; absent keys: the run's values.
    site_keys: tuple[tuple[str, str], ...] = ()
    runtime_port: int = RUNTIME_PORT  # its own per SuperNode when sites share a host
    task: str = DEFAULT_TASK  # which data check the script runs before starting
    # The site's own egress policy (node config `audit-egress`): on unless the site
    # turns it off; the run config cannot turn it off (client/egress_audit.py).
    audit_egress: bool = True

    def to_json(self) -> dict[str, Any]:
        return {"data-path": self.data_path, "site-keys": dict(self.site_keys),
                "runtime-port": self.runtime_port, "task": self.task,
                "audit-egress": self.audit_egress}

    @staticmethod
    def from_json(obj: Mapping[str, Any]) -> BundleSettings:
        # Bundles written before `site-keys` kept the two columns at the top level, also
        # for a task that ignored them (sft): those stay ignored.
        task = str(obj.get("task") or DEFAULT_TASK)
        known = task_info(task).site_keys if task in task_names() else ()
        keys = {k: obj[k] for k in ("text-column", "label-column") if obj.get(k) and k in known}
        keys.update(obj.get("site-keys") or {})
        return BundleSettings(
            data_path=str(obj.get("data-path") or PLACEHOLDER_DATA_PATH),
            site_keys=tuple(sorted((str(k), str(v)) for k, v in keys.items())),
            runtime_port=int(obj.get("runtime-port") or RUNTIME_PORT),
            task=str(obj.get("task") or DEFAULT_TASK),
            audit_egress=bool(obj.get("audit-egress", True)))


def bundle_settings(c: Consortium, site: str) -> BundleSettings:
    """The site's bundle settings (``bundle.json``); the defaults for a new site.

    Raises
    ------
    ConsortiumError
        If ``bundle.json`` exists but is not a JSON object.
    """
    path = c.site_dir(site) / "bundle.json"
    if not path.is_file():
        return BundleSettings()
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConsortiumError(f"{path}: cannot read it: {error}") from error
    if not isinstance(obj, dict):
        raise ConsortiumError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return BundleSettings.from_json(obj)


def add_site(c: Consortium, site: str, *, force: bool = False,
             data_path: str | None = None, public_key: Path | None = None) -> Path:
    """Create a site's bundle folder and its key pair; returns the folder.

    ``public_key``: the site made its own key pair (``fedsft site init``) and sent this
    OpenSSH public key; the bundle then holds no private key. With ``force`` an existing
    site gets a new key (a rotation) and keeps its bundle settings (data path, columns,
    port); ``data_path`` replaces the data path.

    Raises
    ------
    KeyExistsError
        If the site has a key and ``force`` is false.
    ConsortiumError
        If ``public_key`` is not an EC P-384 OpenSSH public key.
    """
    folder = c.site_dir(site)
    for existing in (c.site_key(site), c.site_pub(site)):
        if existing.exists() and not force:
            raise pki.KeyExistsError(f"{existing} exists; use --force to replace it "
                                     "(a key rotation)")
    settings = bundle_settings(c, site)
    if data_path is not None:
        settings = replace(settings, data_path=data_path)
    folder.mkdir(parents=True, exist_ok=True)
    if public_key is not None:
        line = read_site_public_key(public_key)
        c.site_key(site).unlink(missing_ok=True)  # an old coordinator-made key goes
        pki.write_public(c.site_pub(site), line.encode(), force=True)
    else:
        key = pki.new_key()
        pki.write_private(c.site_key(site), pki.ssh_private(key), force=force)
        pki.write_public(c.site_pub(site), pki.ssh_public(key, comment=f"fedsft-{site}"),
                         force=True)
    shutil.copyfile(c.ca_cert, folder / "ca.pem")
    write_bundle_script(c, site, settings)
    return folder


def read_site_public_key(path: Path) -> str:
    """A site's SuperNode public key line, checked to be what Flower accepts (EC P-384).

    Raises
    ------
    ConsortiumError
        If the file cannot be read or holds another kind of key (a private key, too).
    """
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        data = path.read_bytes()
        public = serialization.load_ssh_public_key(data)
    except (OSError, ValueError, UnsupportedAlgorithm) as error:
        raise ConsortiumError(f"--public-key {path}: not an OpenSSH public key "
                              f"({error})") from error
    if not isinstance(public, ec.EllipticCurvePublicKey) or \
            not isinstance(public.curve, ec.SECP384R1):
        raise ConsortiumError(f"--public-key {path}: expected an EC P-384 key "
                              "(`fedsft site init` makes one)")
    return data.decode("ascii").strip() + "\n"


def check_site_keys(task: str, site_keys: Mapping[str, str]) -> None:
    """Refuse a site key that task ``task``'s sites do not set (``TaskInfo.site_keys``)
    or a value Flower's ``key="value"`` node config cannot carry (a quote, a newline).

    Raises
    ------
    ConsortiumError
        Naming the key and what is allowed.
    """
    allowed = task_info(task).site_keys
    for key, value in site_keys.items():
        if key not in allowed:
            raise ConsortiumError(
                f"--{key}: a site of task {task} does not set it; its site keys: "
                f"{', '.join(f'--{k}' for k in allowed) or 'none'}")
        if not value or any(ch in value for ch in '"\\\n\r'):
            raise ConsortiumError(f"--{key} {value!r}: must be non-empty, without quotes, "
                                  "backslashes or line breaks")


def node_config_of(*, data_path: str | Path, site: str,
                   site_keys: Mapping[str, str] | Sequence[tuple[str, str]] = (),
                   audit_egress: bool = False) -> str:
    """The ``--node-config`` value of a site (Flower's ``key="value"`` pairs)."""
    node_config = f'data-path="{data_path}" site-name="{site}"'
    if audit_egress:  # the site's own egress policy: no run config can turn it off
        node_config += " audit-egress=true"
    for key, value in dict(site_keys).items():
        node_config += f' {key}="{value}"'
    return node_config


def supernode_command(
    *,
    superlink: str,
    ca_cert: str | Path,
    private_key: str | Path,
    data_path: str | Path,
    site: str,
    runtime_port: int | None = None,
    site_keys: Mapping[str, str] | Sequence[tuple[str, str]] = (),
    max_wait_time: float | None = RECONNECT_WAIT_S,
    trusted_entities: str | Path | None = None,
    audit_egress: bool = False,
) -> list[str]:
    """The ``flower-supernode`` command line of a site (TLS + authentication).

    ``max_wait_time``: how long it keeps retrying after losing the SuperLink before it
    exits (``--max-wait-time``; None: Flower's default, forever). ``trusted_entities``:
    the YAML file of app-signing keys; with it the SuperNode runs only apps signed by
    one of them. ``audit_egress``: the site requires the egress audit (node config).
    """
    node_config = node_config_of(data_path=data_path, site=site, site_keys=site_keys,
                                 audit_egress=audit_egress)
    command = [
        "flower-supernode",
        "--superlink", superlink,
        "--root-certificates", str(ca_cert),
        "--auth-supernode-private-key", str(private_key),
        "--node-config", node_config,
    ]
    if runtime_port is not None:  # each SuperNode on one machine needs its own port
        command += ["--port", str(runtime_port)]
    if max_wait_time is not None:
        command += ["--max-wait-time", f"{max_wait_time:g}"]
    if trusted_entities is not None:
        command += ["--trusted-entities", str(trusted_entities)]
    return command


def superlink_command(c: Consortium, *, port: int | str, database: str | None = None
                      ) -> list[str]:
    """The ``flower-superlink`` command line: TLS, SuperNode authentication, loopback.

    It binds to 127.0.0.1 only: its Control API must not be reachable by the sites,
    who reach its Fleet API through the proxy (:func:`proxy_settings`). TLS stays on
    the loopback hop (``--enable-supernode-auth`` requires it). ``database``: the
    state file (``--database``); without it Flower keeps registrations, revocations
    and runs in memory, all lost when the SuperLink restarts.
    """
    command = [
        "flower-superlink",
        "--ssl-ca-certfile", str(c.root / "superlink" / "ca.pem"),
        "--ssl-certfile", str(c.server_cert),
        "--ssl-keyfile", str(c.server_key),
        "--enable-supernode-auth",
        "--isolation", "subprocess",
        "--host", "127.0.0.1",
        "--port", str(port),
    ]
    if database:
        command += ["--database", database]
    return command


def proxy_settings(c: Consortium, *, listen_port: int, listen_host: str = ""
                   ) -> proxy.ProxySettings:
    """The public listener of ``c``: its certificate, forwarding to the local address.

    ``listen_host`` empty: every interface (a rehearsal binds 127.0.0.1).
    """
    return proxy.ProxySettings(
        listen_port=listen_port, listen_host=listen_host, superlink=c.local_address,
        cert=c.server_cert, key=c.server_key, ca_cert=c.root / "superlink" / "ca.pem")


def write_superlink_scripts(c: Consortium, *, listen_port: int) -> Path:
    """Write ``superlink/Caddyfile`` and ``superlink/start-superlink.sh``; returns the script."""
    # A loopback public address (a rehearsal) needs no other interface.
    host = "127.0.0.1" if _is_loopback(c.address.rsplit(":", 1)[0]) else ""
    c.caddyfile.write_text(proxy.caddyfile(proxy_settings(c, listen_port=listen_port,
                                                          listen_host=host)),
                           encoding="utf-8")
    local_port = c.local_address.rsplit(":", 1)[1]
    path = c.root / "superlink" / "start-superlink.sh"
    path.write_text(proxy.start_script(
        superlink_command(c, port=local_port, database=str(c.state_db)),
        proxy.caddy_command(c.caddyfile), env=superlink_signing_env(c)), encoding="utf-8")
    path.chmod(0o755)
    return path


def site_check_command(settings: BundleSettings, site: str, *, labels: Sequence[str] = (),
                       label_case_fold: bool = False) -> list[str]:
    """``fedsft check-data`` of the site's node config: run before the SuperNode starts.

    The check of a task with classes (classification) gets the federation's ``labels`` (and
    ``--label-case-fold``) when the consortium knows them (``Consortium.labels``), so a
    site's unknown class stops the script (exit 1) instead of its first round.
    """
    node_config = node_config_of(data_path=settings.data_path, site=site,
                                 site_keys=settings.site_keys)
    command = ["fedsft", "check-data", "--task", settings.task, "--site-config", node_config]
    if labels and task_info(settings.task).has_classes:
        command += ["--labels", ",".join(labels)]
        if label_case_fold:
            command.append("--label-case-fold")
    return command


def _is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    return host in ("localhost", "::1") or host.startswith("127.")


def superlink_host_ports(c: Consortium) -> dict[int, str]:
    """The ports the coordinator's processes hold on the SuperLink's host, and what for."""
    return {
        int(c.address.rsplit(":", 1)[1]): "the public port (Caddy, `address`)",
        int(c.local_address.rsplit(":", 1)[1]): "the SuperLink's own port "
                                                 "(`local-address`)",
        c.app_index_port: "the app index where `fedsft submit` serves the signed app "
                          "(`app-index-port`)",
    }


def check_bundle_port(c: Consortium, port: int) -> str:
    """A site's ClientApp port against the ports taken on the SuperLink's host.

    Returns "" when it cannot collide, else a warning: the site may run on the
    SuperLink's host, which the coordinator cannot know for a public address.

    Raises
    ------
    ConsortiumError
        If the port is one of them and the SuperLink address is a loopback one (so the
        site runs on the SuperLink's host).
    """
    taken = superlink_host_ports(c).get(port)
    if taken is None:
        return ""
    clash = (f"--port {port} is {taken} in {c.root / 'consortium.json'}, taken on the "
             f"SuperLink's host")
    if _is_loopback(c.address.rsplit(":", 1)[0]):
        raise ConsortiumError(f"{clash}; this consortium's SuperLink address {c.address} "
                              f"is a loopback one, so the site shares that host: pick "
                              f"another --port")
    return f"{clash}: if this site runs on that host, pick another --port"


def write_bundle_script(c: Consortium, site: str,
                        settings: BundleSettings | None = None) -> Path:
    """Write ``start-supernode.sh`` (paths relative to it) and ``bundle.json``.

    The script checks the data file first (``fedsft check-data``: a missing, unreadable
    or unusable file stops it with a non-zero exit, the file named), gives the SuperNode
    its own ``FLWR_HOME`` (``flwr-home/`` of the bundle) and ClientApp port, then execs
    ``flower-supernode``. Before that, ``fedsft site verify`` checks the bundle's
    ``ca.pem`` against the fingerprint the site admin read out of band
    (``FEDSFT_CA_FINGERPRINT``) and the address against ``bundle.json``: a tampered
    bundle stops the script before anything connects. The SuperNode runs only apps
    signed with the coordinator's app-signing key (``trusted-entities.yaml``) and
    audits its replies when the site's settings say so (on by default).
    """
    settings = settings or BundleSettings()
    check_site_keys(settings.task, dict(settings.site_keys))
    if not 1 <= settings.runtime_port <= 65535:
        raise ConsortiumError(f"--port must be a TCP port (1-65535), got {settings.runtime_port}")
    command = supernode_command(
        superlink=c.address, ca_cert="$HERE/ca.pem", private_key="$HERE/supernode.key",
        data_path=settings.data_path, site=site, site_keys=settings.site_keys,
        runtime_port=settings.runtime_port,
        trusted_entities="$HERE/trusted-entities.yaml", audit_egress=settings.audit_egress,
    )
    folder = c.site_dir(site)
    write_site_trust(c, site)
    path = folder / "start-supernode.sh"
    _write_script(path, command, here=True, flwr_home="$HERE/flwr-home",
                  before=[["fedsft", "site", "verify", "$HERE", "--address", c.address],
                          site_check_command(settings, site, labels=c.labels,
                                             label_case_fold=c.label_case_fold)])
    (folder / "bundle.json").write_text(json.dumps(
        {**settings.to_json(), **bundle_identity(c)}, indent=2) + "\n", encoding="utf-8")
    return path


def bundle_identity(c: Consortium) -> dict[str, str]:
    """What a site checks a bundle against: the SuperLink address, the CA fingerprint."""
    return {"superlink": c.address, "ca-sha256": pki.fingerprint(pki.load_cert(c.ca_cert))}


def write_site_trust(c: Consortium, site: str) -> Path:
    """The site's ``trusted-entities.yaml``: the app-signing key its SuperNode trusts."""
    path = c.site_dir(site) / "trusted-entities.yaml"
    pki.write_public(path, app_signing.trusted_entities_yaml(
        site_trusted_entities(c)).encode(), force=True)
    return path


_STEP_WHY = {
    "site": "a bundle whose ca.pem or address is not the one read out of band",
    "check-data": "a missing, unreadable or unusable data file",
}


def _quote(part: str) -> str:
    return f'"{part}"' if "$HERE" in part else shlex.quote(part)


def _write_script(path: Path, command: list[str], *, here: bool = False,
                  flwr_home: str | None = None, before: Sequence[list[str]] = (),
                  env: Mapping[str, str] | None = None) -> None:
    quoted = [_quote(part) for part in command]
    lines = ["#!/bin/sh", "# Generated by fedsft. Runtime installs are off: install fedsft first.",
             "set -e"]
    if here:
        lines.append('HERE="$(cd "$(dirname "$0")" && pwd)"')
    lines.append("export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1")
    if flwr_home:  # several SuperNodes on one host must not share installed apps
        lines.append(f'export FLWR_HOME="{flwr_home}"')
    for name, value in (env or {}).items():
        lines.append(f"export {name}={shlex.quote(value)}")
    for step in before:  # `set -e`: a failing step stops the script with its exit code
        lines.append("# Refuse to start: " + _STEP_WHY.get(step[1], "a check failed") + ".")
        lines.append(" ".join(_quote(part) for part in step))
    # One "--flag value" pair per line, for a reader who checks what will run.
    pairs: list[str] = []
    for part in quoted:
        if pairs and pairs[-1].startswith("--") and " " not in pairs[-1] \
                and not part.startswith("--"):
            pairs[-1] += f" {part}"
        else:
            pairs.append(part)
    lines.append("exec " + " \\\n  ".join(pairs))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path.chmod(0o755)
