"""``./cy nats site``: the NATS leaf node of a site, and the user the hub needs for it.

A site runs engines near their users or hardware and a leaf node they connect to; the leaf
joins the hub (the cluster with JetStream, the edges and schedulers) as the site's own user. The
leaf has no JetStream of its own: its engines reach the hub's streams, buckets and object store in
the hub's JetStream domain, through the subject mappings of ``bus_permissions.site_mappings``
(nats-server never lets ``$JS.API``, ``$KV`` or ``$OBJ`` cross a leaf connection within one domain).
"""

from __future__ import annotations

import os
from pathlib import Path

from schemas import names
from services.common import bus_auth, bus_permissions
from services.common.bus_permissions import Permissions


def leaf_config_path(state_dir: Path, site: str) -> Path:
    """Where ``./cy nats site`` writes a site's leaf node config."""
    return state_dir / "nats" / f"site-{names.token(site)}.conf"


def write_site(state_dir: Path, site: str, workers: list[str], hub_urls: list[str], hub_domain: str,
               listen: str) -> tuple[Path, dict[str, Permissions]]:
    """Write the site's leaf node config (mode 0600: it holds the site's seed); return its path and the hub's
    user for the site (public key -> permissions), for every hub node's authorization block.

    Seeds (the site's, and one per engine worker) are created under ``<state dir>/nats/nkeys`` once.
    """
    directory = bus_auth.nkeys_dir(state_dir)
    site_perms = bus_permissions.leaf_site(site, workers, hub_domain)
    site_seed = bus_auth.ensure_seed(directory, site_perms.identity).read_text().strip()
    local = {}
    for worker in workers:
        perms = bus_permissions.in_js_domain(bus_permissions.engine(worker), hub_domain)
        local[bus_auth.public_key(bus_auth.ensure_seed(directory, perms.identity))] = perms
    mappings = ", ".join(f'"{k}": "{v}"' for k, v in bus_permissions.site_mappings(hub_domain).items())
    urls = ", ".join(f'"{url}"' for url in hub_urls)
    text = (f"# Leaf node of site {site} (./cy nats site). No JetStream here: the engines use the hub's,\n"
            f"# in its JetStream domain {hub_domain!r}. Start: nats-server -c <this file>\n"
            f"server_name: cy-site-{names.token(site)}\nlisten: {listen}\nmax_payload: 8MB\n"
            f"{bus_auth.authorization_block(local)}mappings = {{ {mappings} }}\n"
            f"leafnodes {{\n  remotes = [ {{ urls: [{urls}], nkey: \"{site_seed}\" }} ]\n}}\n")
    target = leaf_config_path(state_dir, site)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    return target, {bus_auth.public_key(bus_auth.seed_path(directory, site_perms.identity)): site_perms}


def describe(path: Path, hub_users: dict[str, Permissions], hub_domain: str) -> str:
    """What ``./cy nats site`` prints: where the leaf config is, and what every hub node's config needs."""
    return (f"leaf node config: {path} (holds the site's seed; copy it to the site, start nats-server -c with it)\n"
            f"every hub node needs: jetstream {{ domain: {hub_domain} }}, a leafnodes {{ listen: ... }} block, and "
            "this user in its authorization block (beside ./cy nats permissions --format conf):\n"
            + bus_auth.authorization_block(hub_users))
