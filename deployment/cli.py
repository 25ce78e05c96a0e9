"""``fedsft``: the deployment life cycle on the command line (thin argparse wiring).

    fedsft create DIR --site a --site b [--san host --san 10.0.0.5] [--address host:port]
    fedsft add-site DIR SITE [--data-path P] [--register]
    fedsft bundle DIR SITE --data-path P [--text-column C] [--label-column C]
    fedsft register DIR SITE | fedsft revoke DIR SITE | fedsft sites DIR
    fedsft submit DIR --set labels=a,b --set output-dir=/abs/out ...
    fedsft rehearse --site a=/data/a.csv --site b=/data/b.csv --output-dir out ...
    fedsft export RUN_DIR OUT
    fedsft predict MODEL INPUT --output OUT
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from common.config import ConfigError
from common.data import DataError
from deployment import consortium as cons
from deployment import pki
from deployment.export import ExportError, export_run
from deployment.predict import PredictError, predict_file
from deployment.processes import ProcessError, executable, flower_env, flwr
from deployment.rehearsal import Site, register_site, rehearse, revoke_site
from simulations.runner import APP_DIR
from simulations.scenarios import parse_set

_ERRORS = (ConfigError, DataError, ExportError, PredictError, ProcessError,
           cons.ConsortiumError, pki.KeyExistsError, ValueError)


def _create(args: argparse.Namespace) -> int:
    names = pki.split_names(args.san or ["localhost", "127.0.0.1"])
    c = cons.create(Path(args.dir), name=args.name, names=names, address=args.address,
                    sites=tuple(args.site), force=args.force)
    print(f"[fedsft] consortium {c.root}: SuperLink address {c.address}, "
          f"certificate names {list(names.dns) + list(names.ips)}")
    print(f"[fedsft] start the SuperLink with {c.root / 'superlink' / 'start-superlink.sh'}")
    for site in args.site:
        print(f"[fedsft] site bundle: {c.site_dir(site)}")
    return 0


def _add_site(args: argparse.Namespace) -> int:
    c = cons.Consortium(Path(args.dir).resolve())
    folder = cons.add_site(c, args.site, force=args.force, data_path=args.data_path)
    print(f"[fedsft] site bundle: {folder}")
    if args.register:
        print(f"[fedsft] registered {args.site} as node {register_site(c, args.site)}")
    return 0


def _bundle(args: argparse.Namespace) -> int:
    c = cons.Consortium(Path(args.dir).resolve())
    if not c.site_key(args.site).exists():
        raise cons.ConsortiumError(f"no site {args.site!r}; add it with `fedsft add-site`")
    script = cons.write_bundle_script(c, args.site, data_path=args.data_path,
                                      text_column=args.text_column,
                                      label_column=args.label_column)
    print(f"[fedsft] bundle for {args.site}: {c.site_dir(args.site)} (run {script.name})")
    return 0


def _register(args: argparse.Namespace) -> int:
    c = cons.Consortium(Path(args.dir).resolve())
    print(f"[fedsft] registered {args.site} as node {register_site(c, args.site)}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    c = cons.Consortium(Path(args.dir).resolve())
    print(f"[fedsft] unregistered {args.site} (node {revoke_site(c, args.site)})")
    return 0


def _sites(args: argparse.Namespace) -> int:
    c = cons.Consortium(Path(args.dir).resolve())
    by_id = {str(v["node-id"]): k for k, v in c.registry().items()}
    out = flwr(["supernode", "list", "--format", "json"], flwr_home=c.flwr_home).stdout
    nodes = json.loads(out[out.find("{"):])["nodes"]
    for node in nodes:
        print(f"{by_id.get(node['node-id'], '?'):20s} {node['node-id']:>22s} {node['status']}")
    return 0


def _submit(args: argparse.Namespace) -> int:
    c = cons.Consortium(Path(args.dir).resolve())
    run_config = parse_set(args.set)
    if "output-dir" in run_config:
        run_config["output-dir"] = str(Path(str(run_config["output-dir"])).resolve())
    command = [executable("flwr"), "run", str(args.app), cons.CONNECTION, "--stream"]
    if run_config:
        command += ["--run-config", " ".join(f"{k}={json.dumps(v)}"
                                             for k, v in run_config.items())]
    return subprocess.call(command, env=flower_env(c.flwr_home), cwd=args.app)


def _rehearse(args: argparse.Namespace) -> int:
    sites = []
    for item in args.site:
        name, sep, path = item.partition("=")
        if not sep:
            raise ConfigError(f"--site expects NAME=PATH, got {item!r}")
        sites.append(Site(cons.check_site_name(name), Path(path).expanduser().resolve()))
    run_config = {"output-dir": args.output_dir,
                  "run-name": args.run_name or f"rehearsal-{time.strftime('%Y%m%d-%H%M%S')}",
                  **parse_set(args.set)}
    work_dir = Path(args.work_dir or Path(run_config["output-dir"]) /
                    f"{run_config['run-name']}-deployment")
    result = rehearse(sites, run_config, work_dir=work_dir, app_dir=Path(args.app))
    print(f"[fedsft] outputs: {result.run_dir}")
    print(f"[fedsft] process logs: {work_dir / 'logs'}")
    return result.returncode


def _export(args: argparse.Namespace) -> int:
    out = export_run(Path(args.run_dir), Path(args.out), force=args.force)
    print(f"[fedsft] exported model: {out}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    out = predict_file(Path(args.model), Path(args.input), Path(args.output),
                       text_column=args.text_column, max_length=args.max_length,
                       batch_size=args.batch_size)
    print(f"[fedsft] predictions: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsft", description=(
        "Run fedsft across institutions with Flower's Deployment Engine: create a "
        "consortium (CA, TLS, site keys), bundle, register and revoke sites, rehearse "
        "the deployment on this machine, submit runs, export and use the final model. "
        "See docs/deployment.md."),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("create", help="a consortium: CA, SuperLink certificate, site keys")
    p.add_argument("dir")
    p.add_argument("--name", default="fedsft")
    p.add_argument("--san", action="append", metavar="NAME_OR_IP",
                   help="DNS name or IP of the SuperLink (repeat); "
                        "default: localhost, 127.0.0.1")
    p.add_argument("--address", help="host:port SuperNodes use (default: first name:8000)")
    p.add_argument("--site", action="append", default=[], help="a partner site (repeat)")
    p.add_argument("--force", action="store_true", help="replace existing keys")
    p.set_defaults(func=_create)

    p = sub.add_parser("add-site", help="a new site's key pair and bundle")
    p.add_argument("dir")
    p.add_argument("site")
    p.add_argument("--data-path", default="/path/to/site-data.csv")
    p.add_argument("--register", action="store_true",
                   help="also register it with the running SuperLink")
    p.add_argument("--force", action="store_true", help="replace the site's key")
    p.set_defaults(func=_add_site)

    p = sub.add_parser("bundle", help="(re)write a site's start-supernode.sh")
    p.add_argument("dir")
    p.add_argument("site")
    p.add_argument("--data-path", required=True, help="the data file, as seen at the site")
    p.add_argument("--text-column")
    p.add_argument("--label-column")
    p.set_defaults(func=_bundle)

    for name, func, text in (("register", _register, "flwr supernode register the site"),
                             ("revoke", _revoke, "flwr supernode unregister the site")):
        p = sub.add_parser(name, help=text)
        p.add_argument("dir")
        p.add_argument("site")
        p.set_defaults(func=func)

    p = sub.add_parser("sites", help="flwr supernode list, with site names")
    p.add_argument("dir")
    p.set_defaults(func=_sites)

    p = sub.add_parser("submit", help="flwr run the app on the consortium's SuperLink")
    p.add_argument("dir")
    p.add_argument("--app", default=str(APP_DIR))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_submit)

    p = sub.add_parser("rehearse", help="a local deployment on 127.0.0.1, end to end")
    p.add_argument("--site", action="append", required=True, metavar="NAME=PATH")
    p.add_argument("--output-dir", default="outputs")
    p.add_argument("--run-name", default="")
    p.add_argument("--work-dir", help="keys, state and logs (default: next to the run)")
    p.add_argument("--app", default=str(APP_DIR))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_rehearse)

    p = sub.add_parser("export", help="a run's final model + model card")
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_export)

    p = sub.add_parser("predict", help="label a CSV/JSONL file with an exported model")
    p.add_argument("model")
    p.add_argument("input")
    p.add_argument("--output", required=True, help=".csv or .jsonl")
    p.add_argument("--text-column")
    p.add_argument("--max-length", type=int, help="default: from the export's fedsft.json")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=_predict)
    return parser


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through the `finally` blocks that stop processes


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args))
    except _ERRORS as error:
        print(f"fedsft: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedsft: interrupted; stopped the processes it started", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
