"""``fedsft``: the deployment life cycle on the command line (thin argparse wiring).

    fedsft create DIR --site a --site b [--san host --san 10.0.0.5] [--address host:port]
                  [--local-port 9093] [--app-index-port 9095] [--name N] [--force]
                  [--labels a,b [--label-case-fold]]
    fedsft add-site DIR SITE [--public-key supernode.pub] [--data-path P] [--register]
    fedsft site init DIR --site SITE | fedsft site verify BUNDLE [--fingerprint F]
    fedsft bundle DIR SITE --data-path P [--text-column C ...] [--port N]
                  [--task T] [--no-audit-egress]
    fedsft register DIR SITE | fedsft revoke DIR SITE | fedsft sites DIR
    fedsft submit DIR [--app APP] --set labels=a,b --set output-dir=/abs/out ...
    fedsft rehearse --site a=/data/a.csv --site b=/data/b.csv --output-dir out ...
                    [--attacks] [--restart] [--kill-site NAME]
    fedsft export RUN_DIR OUT [--consortium DIR] [--force]
    fedsft predict MODEL INPUT --output OUT
    fedsft check-data FILE [--site-config KEY=VALUE|node.toml ...] [--labels a,b] ...
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from common.tasks import DEFAULT_TASK, key_owners, task_info, task_names

# Every handler imports what it needs when it runs: `fedsft --help` and usage errors
# must not wait seconds for torch, transformers, datasets and pandas to load.

# The errors whose message says all the user needs (exit 2, no traceback), by module.
_KNOWN_ERRORS = (
    ("common.config", "ConfigError"),
    ("common.data", "DataError"),
    ("deployment.app_signing", "SigningError"),
    ("deployment.consortium", "ConsortiumError"),
    ("deployment.export", "ExportError"),
    ("deployment.pki", "KeyExistsError"),
    ("deployment.predict", "PredictError"),
    ("deployment.processes", "ProcessError"),
    ("deployment.site", "BundleError"),
    ("simulations.scenarios", "ScenarioError"),
)
# How long `submit` waits for the SuperLink to mark a run finished after its log ends.
_STATUS_WAIT_S = 15.0


def known_errors() -> tuple[type[BaseException], ...]:
    """The exception types reported as one ``fedsft: error:`` paragraph, without traceback.

    Only modules already imported are looked at: an error type of a module never
    imported cannot have been raised, and importing one here would cost seconds.
    ``ValueError`` stands for the argument checks of pki (``--san``) and the like.
    """
    found: list[type[BaseException]] = [ValueError]
    for module, name in _KNOWN_ERRORS:
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def error_message(error: BaseException, *, known: bool, debug: bool) -> str:
    """The last line ``fedsft`` prints for an error."""
    if known:
        return f"fedsft: error: {error}"
    hint = "" if debug else " (run with --debug for the traceback)"
    return f"fedsft: error: {type(error).__name__}: {error}{hint}"


def _app_dir(app: str | None) -> Path:
    from simulations.runner import APP_DIR

    return Path(app).resolve() if app else APP_DIR


def _consortium(folder: str) -> Any:
    from deployment import consortium as cons

    c = cons.Consortium(Path(folder).resolve())
    _ = c.settings  # raises ConsortiumError for a folder that is not a consortium
    return c


def _create(args: argparse.Namespace) -> int:
    from deployment import consortium as cons
    from deployment import pki

    names = pki.split_names(args.san or ["localhost", "127.0.0.1"])
    labels: list[str] = []
    from common.config import ConfigError, RunConfig

    if args.label_case_fold and args.labels is None:
        # Nothing would be kept: consortium.json holds label-case-fold with the labels.
        raise ConfigError("--label-case-fold needs --labels (it says how the runs compare "
                          "the federation's classes); give --labels a,b,... or leave "
                          "--label-case-fold out")
    if args.labels is not None:
        # The run's rule for `labels`: RunConfig raises ConfigError for fewer than 2
        # distinct classes; an empty value would mean "no labels", not a federation's.
        try:
            labels = RunConfig(labels=args.labels, label_case_fold=args.label_case_fold
                               ).label_list
        except ConfigError as error:
            raise ConfigError(f"--labels {args.labels!r}: {error}") from error
        if not labels:
            raise ConfigError(f"--labels must name at least 2 distinct classes, "
                              f"got {args.labels!r}")
    c = cons.create(Path(args.dir), name=args.name, names=names, address=args.address,
                    sites=tuple(args.site), force=args.force,
                    local_port=args.local_port or cons.LOCAL_PORT,
                    app_index_port=args.app_index_port or cons.app_signing.APP_INDEX_PORT,
                    labels=labels, label_case_fold=args.label_case_fold)
    print(f"[fedsft] consortium {c.root}: SuperLink address {c.address} (sites: Fleet API "
          f"only), admin address {c.local_address} (this host only), "
          f"certificate names {list(names.dns) + list(names.ips)}")
    print(f"[fedsft] start the SuperLink with {c.root / 'superlink' / 'start-superlink.sh'}")
    _print_fingerprint(c)
    if labels:
        print(f"[fedsft] the federation's labels: {', '.join(labels)} (each classification "
              f"bundle's data check refuses a file with others)")
    for site in args.site:
        print(f"[fedsft] site bundle: {c.site_dir(site)}")
    return 0


def _print_fingerprint(c: Any) -> None:
    """The CA fingerprint each site admin must hear from the coordinator out of band."""
    from deployment import consortium as cons

    identity = cons.bundle_identity(c)
    print(f"[fedsft] CA SHA-256 fingerprint: {identity['ca-sha256']}")
    print(f"[fedsft] tell each site admin this fingerprint and the address "
          f"{identity['superlink']} out of band (phone, in person): start-supernode.sh "
          f"refuses a bundle whose ca.pem does not match FEDSFT_CA_FINGERPRINT")


def _add_site(args: argparse.Namespace) -> int:
    from deployment import consortium as cons
    from deployment.registry import register_site

    c = _consortium(args.dir)
    public_key = Path(args.public_key).expanduser() if args.public_key else None
    folder = cons.add_site(c, args.site, force=args.force, data_path=args.data_path,
                           public_key=public_key)
    print(f"[fedsft] site bundle: {folder}"
          + (" (no private key: the site keeps its own)" if public_key else ""))
    _print_fingerprint(c)
    if args.register:
        _print_registered(c, args.site, register_site(c, args.site))
    return 0


def _print_registered(c: Any, site: str, node_id: int) -> None:
    print(f"[fedsft] registered {site} as node {node_id}")
    for old in c.registry()[site].get("replaced-node-ids", []):
        print(f"[fedsft] {site}'s earlier key is still registered as node {old}: once the "
              f"site runs with the new key, `FLWR_HOME={c.flwr_home} flwr supernode "
              f"unregister {old}`")


def _bundle(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from deployment import consortium as cons

    c = _consortium(args.dir)
    if not c.site_pub(args.site).exists():
        raise cons.ConsortiumError(f"no site {args.site!r}; add it with `fedsft add-site`")
    # Options not given keep the bundle's earlier values (bundle.json).
    earlier = cons.bundle_settings(c, args.site)
    task = args.task or earlier.task
    # Earlier site keys the (maybe new) task has no use for are dropped; given ones are
    # checked against the task (``write_bundle_script``).
    site_keys = {k: v for k, v in earlier.site_keys if k in task_info(task).site_keys}
    site_keys.update({key: value for key in key_owners(lambda info: info.site_keys)
                      if (value := getattr(args, key.replace("-", "_"))) is not None})
    given = {"data_path": args.data_path, "runtime_port": args.port, "task": args.task,
             "audit_egress": args.audit_egress}
    settings = replace(earlier, site_keys=tuple(sorted(site_keys.items())),
                       **{k: v for k, v in given.items() if v is not None})
    warning = cons.check_bundle_port(c, settings.runtime_port)
    if warning:
        print(f"fedsft: warning: {warning}", file=sys.stderr)
    script = cons.write_bundle_script(c, args.site, settings)
    print(f"[fedsft] bundle for {args.site}: {c.site_dir(args.site)} (run {script.name})")
    _print_fingerprint(c)
    return 0


def _site_init(args: argparse.Namespace) -> int:
    from deployment import consortium as cons
    from deployment.site import site_init

    keys = site_init(Path(args.dir).expanduser().resolve(),
                     site=cons.check_site_name(args.site), force=args.force)
    print(f"[fedsft] private key: {keys.private_key} (0600: it stays here)")
    print(f"[fedsft] send this public key to the coordinator ({keys.public_key}):")
    print(keys.public_key.read_text(encoding="utf-8").strip())
    print("[fedsft] then copy the bundle you get back into this folder, next to the key")
    return 0


def _site_verify(args: argparse.Namespace) -> int:
    import os

    from deployment.site import ADDRESS_ENV, fingerprint_from_env, verify_bundle

    folder = Path(args.bundle).expanduser().resolve()
    verified = verify_bundle(folder, fingerprint=args.fingerprint or fingerprint_from_env(),
                             address=args.address,
                             expected_address=os.environ.get(ADDRESS_ENV) or None)
    print(f"[fedsft] bundle {folder}: ca.pem matches the fingerprint {verified}")
    return 0


def _register(args: argparse.Namespace) -> int:
    from deployment.registry import register_site

    c = _consortium(args.dir)
    _print_registered(c, args.site, register_site(c, args.site))
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from deployment.registry import revoke_site

    c = _consortium(args.dir)
    print(f"[fedsft] unregistered {args.site} (node {revoke_site(c, args.site)})")
    return 0


def _sites(args: argparse.Namespace) -> int:
    from deployment.processes import flwr_json

    c = _consortium(args.dir)
    by_id = {str(v["node-id"]): k + (" (revoked)" if v.get("revoked") else "")
             for k, v in c.registry().items()}
    for node in flwr_json(["supernode", "list"], flwr_home=c.flwr_home)["nodes"]:
        print(f"{by_id.get(node['node-id'], '?'):20s} {node['node-id']:>22s} {node['status']}")
    return 0


def submit_run_config(app_dir: Path, items: list[str]) -> dict[str, Any]:
    """The ``--set`` overrides of ``fedsft submit``, checked before anything is submitted.

    ``output-dir`` (default: the app's, ``outputs``) and ``resume-from`` are sent as
    absolute paths, resolved against this command's working directory (the ServerApp
    runs in another one). For task sft ``dataset`` defaults to ``"none"`` (the data is
    only at the sites: central evaluation only on an ``eval-dataset``), the counterpart
    of classification's required ``labels``.
    The overrides on top of the app's ``[tool.flwr.app.config]`` must make a valid
    ``RunConfig``, as the ServerApp will build it.

    Raises
    ------
    ConfigError
        If a key is not a run-config key, a value is invalid, or ``app_dir`` has no
        readable pyproject.toml.
    """
    from common.config import NO_DATASET, RunConfig
    from simulations.scenarios import parse_set

    run_config = parse_set(items)
    defaults = _app_defaults(app_dir)
    # Sent absolute, so the ServerApp writes where this command (and its preflight)
    # looked, not relative to the SuperLink's working directory.
    run_config.setdefault("output-dir", defaults.get("output-dir", "outputs"))
    task = str({**defaults, **run_config}.get("task") or DEFAULT_TASK)
    if task in task_names() and task_info(task).deploy_without_dataset:
        # The coordinator holds no site's data: never evaluate on the built-in examples
        # (TaskInfo.deploy_without_dataset; an unknown task is refused by RunConfig below).
        run_config.setdefault("dataset", NO_DATASET)
    for key in ("output-dir", "resume-from"):
        if run_config.get(key):
            run_config[key] = str(Path(str(run_config[key])).expanduser().resolve())
    RunConfig.from_flower({**defaults, **run_config})
    return run_config


def _app_defaults(app_dir: Path) -> dict[str, Any]:
    """The app's run-config defaults (``[tool.flwr.app.config]`` of its pyproject.toml)."""
    import tomllib

    from common.config import ConfigError

    pyproject = app_dir / "pyproject.toml"
    try:
        project = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise ConfigError(f"--app {app_dir}: cannot read {pyproject.name}: {error}") from error
    return dict(project.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))


def _run_status(c: Any, run_id: int) -> Any:
    """The run's status at the SuperLink, waiting a little for it to be marked finished."""
    from deployment import consortium as cons
    from deployment.processes import flwr_json, parse_run_status

    deadline = time.monotonic() + _STATUS_WAIT_S
    while True:
        status = parse_run_status(flwr_json(["list", cons.CONNECTION, "--run-id", str(run_id)],
                                            flwr_home=c.flwr_home), run_id)
        if status.finished or time.monotonic() > deadline:
            return status
        time.sleep(1)


def _submit(args: argparse.Namespace) -> int:
    import json
    import subprocess

    from deployment import consortium as cons
    from deployment.processes import (
        ProcessError,
        executable,
        flower_env,
        follow_run,
        started_run_id,
    )

    c = _consortium(args.dir)
    app = _app_dir(args.app)
    run_config = submit_run_config(app, args.set)
    if not args.no_preflight:
        from common.config import RunConfig
        from server.preflight import preflight

        # The paths are read here as the ServerApp will read them at the SuperLink:
        # submit from the SuperLink's host, or pass --no-preflight.
        cfg = RunConfig.from_flower({**_app_defaults(app), **run_config})
        for note in preflight(cfg, num_partitions=None):
            print(f"[fedsft] preflight: {note}", flush=True)
    index = cons.signed_app_index(c, app)
    print(f"[fedsft] signed {index.spec} (FAB sha256 {index.sha[:16]}...) with "
          f"{c.app_signing_key}", flush=True)
    command = [executable("flwr"), "run", index.spec, cons.CONNECTION, "--stream"]
    if run_config:
        command += ["--run-config", " ".join(f"{k}={json.dumps(v)}"
                                             for k, v in run_config.items())]
    run_ids: list[int] = []

    def show(line: str) -> None:
        print(line, flush=True)
        if not run_ids and (run_id := started_run_id(line)) is not None:
            run_ids.append(run_id)

    try:
        with index:  # the SuperLink fetches the signed FAB from it when the run starts
            code = follow_run(command, env=flower_env(c.flwr_home), cwd=app, on_line=show)
    except KeyboardInterrupt:
        if run_ids:
            n = run_ids[0]
            print(f"fedsft: stopped following run {n}; it goes on at the SuperLink "
                  f"(`flwr log {n}` follows it, `flwr stop {n}` stops it)", file=sys.stderr)
        raise
    if not run_ids:
        raise ProcessError(f"`flwr run` exited {code} without starting a run "
                           "(its output is above)")
    # `flwr run --stream` exits 0 also when the ServerApp failed: ask the SuperLink.
    try:
        status = _run_status(c, run_ids[0])
    except (ProcessError, subprocess.TimeoutExpired) as error:
        print(f"fedsft: error: run {run_ids[0]}: {error}; see `flwr log {run_ids[0]}`",
              file=sys.stderr)
        return 1
    if status.completed:
        print(f"[fedsft] {status.describe()}")
        return 0
    print(f"fedsft: error: {status.describe()}", file=sys.stderr)
    return 1


def _rehearse(args: argparse.Namespace) -> int:
    from common.config import ConfigError
    from deployment import consortium as cons
    from deployment.rehearsal import Site, rehearse
    from simulations.scenarios import parse_set

    sites = []
    for item in args.site:
        name, sep, path = item.partition("=")
        if not sep:
            raise ConfigError(f"--site expects NAME=PATH, got {item!r}")
        sites.append(Site(cons.check_site_name(name), Path(path).expanduser().resolve()))
    if args.kill_site is not None and args.kill_site not in {s.name for s in sites}:
        raise ConfigError(f"--kill-site {args.kill_site!r} is not one of the --site names "
                          f"({', '.join(s.name for s in sites)})")
    run_config = {"output-dir": args.output_dir,
                  "run-name": args.run_name or f"rehearsal-{time.strftime('%Y%m%d-%H%M%S')}",
                  **parse_set(args.set)}
    work_dir = Path(args.work_dir or Path(run_config["output-dir"]) /
                    f"{run_config['run-name']}-deployment")
    result = rehearse(sites, run_config, work_dir=work_dir, app_dir=_app_dir(args.app),
                      attacks=args.attacks, restart=args.restart,
                      kill_site=args.kill_site)
    print(f"[fedsft] outputs: {result.run_dir}")
    print(f"[fedsft] process logs: {work_dir / 'logs'}")
    if result.message:
        print(f"fedsft: error: the rehearsal's run failed: {result.message}", file=sys.stderr)
    return result.returncode


def _export(args: argparse.Namespace) -> int:
    from deployment.export import export_run

    out = export_run(Path(args.run_dir), Path(args.out), force=args.force,
                     consortium=Path(args.consortium) if args.consortium else None)
    print(f"[fedsft] exported model: {out}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from deployment.predict import predict_file

    out = predict_file(Path(args.model), Path(args.input), Path(args.output),
                       text_column=args.text_column, max_length=args.max_length,
                       batch_size=args.batch_size)
    print(f"[fedsft] predictions: {out}")
    return 0


# A node-config item: KEY=VALUE, the value a TOML value or a bare word (Flower's syntax).
_SITE_PAIR = r"""(\S+?)=('[^']*'|"[^"]*"|\S+)"""


def parse_site_config(items: list[str]) -> dict[str, Any]:
    """The node config of ``--site-config``: a TOML file, or ``KEY=VALUE`` items.

    Each item is the path of a ``.toml`` file (its top-level keys) or one or more
    space-separated ``KEY=VALUE`` pairs as in ``flower-supernode --node-config``
    (``data-path="/data/a.csv" text-column="note"``); an unquoted value that is not a
    TOML value is taken as a string (``data-path=/data/a.csv``). Later items win.

    Raises
    ------
    ConfigError
        If a TOML file cannot be read or an item holds no ``KEY=VALUE`` pair.
    """
    import re
    import tomllib

    from common.config import ConfigError

    config: dict[str, Any] = {}
    for item in items:
        if item.endswith(".toml"):
            try:
                config.update(tomllib.loads(Path(item).expanduser().read_text("utf-8")))
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
                raise ConfigError(f"--site-config {item}: cannot read it: {error}") from error
            continue
        pairs = re.findall(_SITE_PAIR, item)
        if not pairs:
            raise ConfigError(f"--site-config expects KEY=VALUE or a .toml file, got {item!r}")
        for key, value in pairs:
            try:
                config[key] = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                config[key] = value
    return config


def _check_data(args: argparse.Namespace) -> int:

    from common.config import ConfigError
    from common.specs import DataSpec, EncodeSpec
    from common.tasks import get_site_check

    site = parse_site_config(args.site_config)
    path = args.file or site.get("data-path")
    if not path:
        raise ConfigError("check-data needs a FILE or a --site-config with data-path")
    # RunConfig validates the values as a run would (and applies the `labels` rule).
    cfg = site_check_config(args, site)
    # Without --model the light check (no torch, transformers, sklearn): every SuperNode
    # start runs it. With it, the tokens are counted as training encodes them.
    tokenizer = _check_tokenizer(cfg.model_name) if args.model else None
    report = get_site_check(args.task)(
        str(path), spec=DataSpec.of(cfg.replace(dataset=str(path))),
        encoding=EncodeSpec.of(cfg, tokenizer_path=getattr(tokenizer, "name_or_path", "")),
        label_names=cfg.label_list or None, tokenizer=tokenizer, eval_path=args.eval,
    )
    return _report(report, args.json)


def _check_tokenizer(model: str) -> Any:
    """The tokenizer of the run's ``model`` (``--model``), as the client loads it."""
    from transformers import AutoTokenizer

    from common.model_source import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model).path)


def site_check_config(args: argparse.Namespace, site: dict[str, Any]) -> Any:
    """The ``RunConfig`` a site check of ``--task`` reads and encodes with: each of the
    task's ``check_keys``, ``model`` and ``max-length`` from its flag, else (one of the
    task's ``site_keys``, which the client reads from the node config too) the node
    config (``--site-config``), else the default. Raises ``ConfigError`` for a bad
    value."""
    from common.config import RunConfig

    info = task_info(args.task)
    given: dict[str, Any] = {"task": args.task}
    for key in (*info.check_keys, "model", "max-length"):
        value = getattr(args, key.replace("-", "_"), None)
        if value is None and key in info.site_keys:
            value = site.get(key)
        if value is not None:
            given[key] = value
    return RunConfig.from_flower(given)


def _report(report: Any, json_path: str | None) -> int:
    """Print a site check's report (and write it as JSON when asked); its exit status."""
    import json

    print("\n".join(report.lines()))
    if json_path:
        Path(json_path).write_text(json.dumps(report.to_dict(), indent=2) + "\n",
                                   encoding="utf-8")
        print(f"[fedsft] report: {json_path}")
    return 1 if report.blocking else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsft", description=(
        "Run fedsft across institutions with Flower's Deployment Engine: create a "
        "consortium (CA, TLS, site keys), bundle, register and revoke sites, rehearse "
        "the deployment on this machine, submit runs, export and use the final model. "
        "See docs/deployment.md."),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    debug_help = "show the traceback of an error"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    # Also accepted after the subcommand; SUPPRESS keeps a --debug given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    p = add("create", help="a consortium: CA, SuperLink certificate, site keys")
    p.add_argument("dir")
    p.add_argument("--name", default="fedsft")
    p.add_argument("--san", action="append", metavar="NAME_OR_IP",
                   help="DNS name or IP of the SuperLink (repeat); "
                        "default: localhost, 127.0.0.1")
    p.add_argument("--address", help="host:port SuperNodes use (default: first name:8000)")
    p.add_argument("--local-port", type=int,
                   help="the SuperLink's own port on 127.0.0.1 (Control API, for the "
                        "coordinator's flwr CLI; default 9093)")
    p.add_argument("--app-index-port", type=int,
                   help="the loopback port where `fedsft submit` serves the signed app to "
                        "the SuperLink (default 9095)")
    p.add_argument("--site", action="append", default=[], help="a partner site (repeat)")
    p.add_argument("--labels", metavar="A,B,...",
                   help="the federation's classes (the runs' `labels`), kept in "
                        "consortium.json: each classification bundle's start-supernode.sh "
                        "then refuses a data file with other labels (check-data --labels)")
    p.add_argument("--label-case-fold", action="store_true",
                   help="with --labels: the runs case-fold string labels "
                        "(`label-case-fold`), and so does the bundles' data check")
    p.add_argument("--force", action="store_true", help="replace existing keys")
    p.set_defaults(func=_create)

    p = add("add-site", help="a new site's key pair and bundle")
    p.add_argument("dir")
    p.add_argument("site")
    p.add_argument("--data-path", help="the data file, as seen at the site (default: the "
                                      "bundle's earlier one, else a placeholder)")
    p.add_argument("--public-key", metavar="SUPERNODE_PUB",
                   help="the site made its own key pair (`fedsft site init`): register "
                        "this OpenSSH public key; the bundle then holds no private key")
    p.add_argument("--register", action="store_true",
                   help="also register it with the running SuperLink")
    p.add_argument("--force", action="store_true",
                   help="replace the site's key (a rotation: the bundle keeps its data path)")
    p.set_defaults(func=_add_site)

    p = add("bundle", help="(re)write a site's start-supernode.sh")
    p.add_argument("dir")
    p.add_argument("site")
    p.add_argument("--data-path", required=True, help="the data file, as seen at the site")
    # Each task's node-config keys for a site's own file.
    for key, tasks in key_owners(lambda info: info.site_keys).items():
        p.add_argument(f"--{key}", help=f"{', '.join(tasks)}: the site's `{key}` "
                                        "(default: the bundle's earlier value, else the "
                                        "run's)")
    p.add_argument("--port", type=int,
                   help="the SuperNode's ClientApp port on 127.0.0.1 (default 9094): "
                        "each SuperNode on one host needs its own")
    p.add_argument("--task", choices=task_names(),
                   help="the federation's task: which data check runs before the "
                        "SuperNode starts (default classification)")
    p.add_argument("--no-audit-egress", dest="audit_egress", action="store_const",
                   const=False, default=None,
                   help="do not require the egress audit in the site's node config "
                        "(default: required, whatever the run config says)")
    p.set_defaults(func=_bundle)

    p = add("site", help="at a site: make its key pair, verify a bundle before starting")
    site_sub = p.add_subparsers(dest="site_command", required=True)
    q = site_sub.add_parser("init", parents=[common],
                            help="make the site's SuperNode key pair here; print the "
                                 "public key to send to the coordinator")
    q.add_argument("dir", help="the site's folder (created 0700); the bundle goes here too")
    q.add_argument("--site", required=True, help="the site's name (the key's comment)")
    q.add_argument("--force", action="store_true", help="replace an existing key")
    q.set_defaults(func=_site_init)
    q = site_sub.add_parser("verify", parents=[common],
                            help="check a bundle's ca.pem against the CA fingerprint read "
                                 "out of band (start-supernode.sh runs it)",
                            description="Exit 0 if the bundle's ca.pem has the given "
                                        "SHA-256 fingerprint and its address is the "
                                        "bundle's; 2 otherwise.")
    q.add_argument("bundle", help="the bundle folder (ca.pem, bundle.json)")
    q.add_argument("--fingerprint", help="the CA's SHA-256 fingerprint as the coordinator "
                                         "read it to you (default: $FEDSFT_CA_FINGERPRINT)")
    q.add_argument("--address", help="the address the start script connects to; it must "
                                     "be the bundle's (and $FEDSFT_SUPERLINK if set)")
    q.set_defaults(func=_site_verify)

    for name, func, text in (("register", _register, "flwr supernode register the site"),
                             ("revoke", _revoke, "flwr supernode unregister the site")):
        p = add(name, help=text)
        p.add_argument("dir")
        p.add_argument("site")
        p.set_defaults(func=func)

    p = add("sites", help="flwr supernode list, with site names")
    p.add_argument("dir")
    p.set_defaults(func=_sites)

    p = add("submit", help="flwr run the app on the consortium's SuperLink",
            description="flwr run the app on the consortium's SuperLink and stream its "
                        "log. Exit code: 0 if the run completed, 1 if it failed, was "
                        "stopped or its status is unknown, 2 if nothing was submitted "
                        "(a bad --set, a folder that is not a consortium, a preflight "
                        "check that failed).")
    p.add_argument("dir")
    p.add_argument("--app", help="the Flower App folder (default: this fedsft checkout)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a run-config key (repeat); checked before submitting")
    p.add_argument("--no-preflight", action="store_true",
                   help="skip the checks of the server's data, model, output and "
                        "resume folders (they read paths as seen from this machine: "
                        "skip them when submitting from another host than the "
                        "SuperLink's)")
    p.set_defaults(func=_submit)

    p = add("rehearse", help="a local deployment on 127.0.0.1, end to end")
    p.add_argument("--site", action="append", required=True, metavar="NAME=PATH")
    p.add_argument("--output-dir", default="outputs")
    p.add_argument("--run-name", default="")
    p.add_argument("--work-dir", help="keys, state and logs (default: next to the run)")
    p.add_argument("--app", help="the Flower App folder (default: this fedsft checkout)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--attacks", action="store_true",
                   help="after the run, try the site-side attacks (unsigned, foreign-signed "
                        "and modified apps, a tampered bundle): exit 1 unless all refused")
    p.add_argument("--restart", action="store_true",
                   help="after the run, do it again, kill the SuperLink once round 1 is "
                        "recorded, restart it and resume with `fedsft submit --set "
                        "resume-from=...`: exit 1 unless it ends with the same weights")
    p.add_argument("--kill-site", metavar="NAME",
                   help="last, do the run again with one more round and kill that site's "
                        "SuperNode once round 1 is recorded: exit 1 unless the run "
                        "completes and a later round records the site by name")
    p.set_defaults(func=_rehearse)

    p = add("export", help="a run's final model + model card")
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("--force", action="store_true")
    p.add_argument("--consortium", metavar="DIR",
                   help="the consortium folder: the card names the app's signature "
                        "(from its signing log, checked against its app-signing key)")
    p.set_defaults(func=_export)

    p = add("predict", help="label a CSV/JSONL file (classification) or answer its prompts "
                            "(sft) with an exported model")
    p.add_argument("model")
    p.add_argument("input")
    p.add_argument("--output", required=True,
                   help=".csv or .jsonl; written when complete, never the input file")
    p.add_argument("--text-column")
    p.add_argument("--max-length", type=int, help="default: from the export's fedsft.json")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=_predict)

    p = add("check-data", help="check a site's data file before it joins",
            description="Check a site's data before it joins a federation (classification; "
                        "with --task sft: rows refused and without an assistant turn, "
                        "duplicates, eval overlap; token lengths with --model): "
                        "rows dropped and why, label distribution and imbalance, "
                        "duplicates, short and over-long texts, eval overlap, labels "
                        "unknown to the federation. Exit code: 0 if no blocking problem "
                        "(warnings allowed), 1 if a blocking problem, 2 if the file or "
                        "an argument is unusable.")
    p.add_argument("file", nargs="?", help="the data file (default: data-path of "
                                           "--site-config)")
    p.add_argument("--site-config", action="append", default=[],
                   metavar="KEY=VALUE|NODE_CONFIG.toml",
                   help="the site's node config (data-path and the task's column keys, "
                        "e.g. text-column), as given to flower-supernode --node-config "
                        "(repeat)")
    p.add_argument("--max-length", type=int,
                   help="the run's max-length in tokens (default 64); counted with "
                        "--model's tokenizer, else (classification) estimated by "
                        "whitespace words, a lower bound, or (sft) not checked")
    p.add_argument("--model",
                   help="the run's `model` (a name, folder or Hub id): its tokenizer "
                        "counts the tokens as training encodes them (loads transformers; "
                        "default: no tokenizer)")
    p.add_argument("--eval", help="an eval file whose texts (sft: conversations) should "
                                  "not be in FILE")
    p.add_argument("--task", choices=task_names(), default=DEFAULT_TASK,
                   help="the run's task: which check runs and which of the options "
                        "below (each named with its task) it reads; sft reads every row "
                        "as a conversation with the run's chat columns (else the node "
                        "config's keys of the same names); token lengths with --model")
    # Each task's check keys, as flags its check reads (a key two tasks share: one flag,
    # the same CheckFlag in both, which the registry's test holds).
    for key, readers in key_owners(lambda info: info.check_keys).items():
        info = task_info(readers[0])
        flag = next(f for f in info.check_flags if f.key == key)
        site_default = "the node config's, else " if key in info.site_keys else ""
        text = f"{', '.join(readers)}: " + (flag.help or f"the run's `{key}` (default: "
                                                          f"{site_default}the run default)")
        if flag.switch:  # None when absent: the node config's or the default then
            p.add_argument(f"--{key}", action="store_const", const=True, help=text)
        else:
            p.add_argument(f"--{key}", help=text)
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.set_defaults(func=_check_data)
    return parser


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through the `finally` blocks that stop processes


def main(argv: list[str] | None = None) -> int:
    """Run one ``fedsft`` command; returns the exit code.

    0: done; 1: an unexpected error (its type and message; ``--debug`` adds the
    traceback) or, for ``submit``, a run that did not complete; 2: a usage error or an
    error whose message names the problem (a missing file, a bad key, ...); 130:
    interrupted.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error argparse has printed
        return 0 if stop.code is None else stop.code if isinstance(stop.code, int) else 2
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("fedsft: interrupted; stopped the processes it started", file=sys.stderr)
        return 130
    except Exception as error:  # the one place every error is reported
        known = isinstance(error, known_errors())
        if args.debug:
            traceback.print_exc()
        print(error_message(error, known=known, debug=args.debug), file=sys.stderr)
        return 2 if known else 1


if __name__ == "__main__":
    sys.exit(main())
