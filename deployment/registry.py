"""The coordinator's site registry: Flower's node registrations, with site names.

``registry.json`` of the consortium maps a site to the node id ``flwr supernode
register`` gave its public key; ``fedsft register`` / ``revoke`` / ``add-site
--register`` go through here. Kept apart from the rehearsal so that those commands
load only what they need.
"""

from __future__ import annotations

from pathlib import Path

from deployment import consortium as cons
from deployment.processes import flwr, flwr_json


def register_site(c: cons.Consortium, site: str) -> int:
    """Register a site's public key with the SuperLink; remember its node id.

    A site whose current key was revoked is refused with the way back: Flower never
    accepts a revoked public key again, so re-admitting it takes a new key pair
    (``fedsft add-site DIR SITE --force --register``). A new key of a registered site
    (a rotation) is registered and the old node id kept under ``replaced-node-ids``, to
    be unregistered once the site runs with the new key.

    Raises
    ------
    ConsortiumError
        If the site's key was revoked, or the SuperLink's reply gives no node id.
    """
    public_key = c.site_pub(site).read_text(encoding="utf-8").strip()
    registry = c.registry()
    entry = dict(registry.get(site) or {})
    if entry.get("revoked") and entry.get("public-key") == public_key:
        raise cons.ConsortiumError(
            f"site {site!r}: its key was revoked (node {entry['node-id']}) and Flower "
            f"never accepts a revoked key again; re-admit the site with a new key: "
            f"`fedsft add-site {c.root} {site} --force --register`, then send it the "
            f"new bundle")
    reply = flwr_json(["supernode", "register", str(c.site_pub(site))], flwr_home=c.flwr_home)
    if not isinstance(reply, dict) or "node-id" not in reply:
        raise cons.ConsortiumError(
            f"`flwr supernode register` of site {site!r} gave no node id: {reply}")
    node_id = int(reply["node-id"])
    replaced = list(entry.get("replaced-node-ids", []))
    if "node-id" in entry and not entry.get("revoked") and entry["node-id"] != node_id:
        replaced.append(int(entry["node-id"]))  # still registered: unregister it later
    registry[site] = {"node-id": node_id, "public-key": public_key,
                      **({"replaced-node-ids": replaced} if replaced else {})}
    c.save_registry(registry)
    return node_id


def revoke_site(c: cons.Consortium, site: str) -> int:
    """Unregister a site's node id from the SuperLink; returns the id.

    The registry keeps the site, marked ``revoked``, so that ``register`` can tell a
    revoked key from a new one.
    """
    registry = c.registry()
    entry = registry.get(site)
    if entry is None:
        raise cons.ConsortiumError(f"site {site!r} is not registered (registry.json)")
    if entry.get("revoked"):
        raise cons.ConsortiumError(f"site {site!r} is already revoked "
                                   f"(node {entry['node-id']})")
    node_id = int(entry["node-id"])
    flwr(["supernode", "unregister", str(node_id)], flwr_home=c.flwr_home)
    registry[site] = {**entry, "revoked": True}
    c.save_registry(registry)
    return node_id


def site_flwr_home(c: cons.Consortium, site: str, folder: Path) -> Path:
    """A ``FLWR_HOME`` made of what the site's bundle holds: the address, ``ca.pem``.

    This is the connection a site would write to try the Control API itself.
    """
    cons.write_flwr_config(folder, address=c.address, ca_cert=c.site_dir(site) / "ca.pem")
    return folder
