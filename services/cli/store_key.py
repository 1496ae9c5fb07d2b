"""``./cy up --nats-encrypt``: the embedded JetStream store encrypted at rest, and where its key lives.

nats-server encrypts every stream file (ChaCha20-Poly1305, ``jetstream { cipher: chachapoly }``)
with a key it reads from ``$CY_NATS_JS_KEY`` (the config names the variable, never the key). The
key is that variable when it is set (keep it off the machine's disk: a secret manager, a prompt),
else ``<state dir>/nats/jetstream.key`` (0600, created on first use): that protects copies of the
store directory, not a stolen disk. A state dir whose store was once encrypted stays encrypted
(nats-server cannot read it without the key), so later ``./cy up`` runs need no flag.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from services.cli.errors import CliError
from services.common.natsserver import STORE_KEY_ENV

KEY_FILE = "jetstream.key"
# Written when the key came from the environment: the store is encrypted, its key is not here.
MARKER = "jetstream.encrypted"


def store_key(state_dir: Path, wanted: bool) -> str | None:
    """The key to encrypt the embedded store with, or None (plain): given ``--nats-encrypt`` or
    an already-encrypted state dir."""
    directory = state_dir / "nats"
    key_file, marker = directory / KEY_FILE, directory / MARKER
    from_env = os.environ.get(STORE_KEY_ENV, "")
    if not (wanted or key_file.exists() or marker.exists()):
        return None
    directory.mkdir(parents=True, exist_ok=True)
    if from_env:
        marker.touch()
        return from_env
    if key_file.exists():
        return key_file.read_text().strip()
    if marker.exists():
        raise CliError(f"the NATS store of {state_dir} is encrypted with a key from ${STORE_KEY_ENV}: set it")
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    key = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as out:
        out.write(key + "\n")
    return key
