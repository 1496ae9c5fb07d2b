"""Auth without HTTP: the key format, the scope table, JWT scope claims, and the loopback rule."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from schemas.auth import Scope, grants
from services.common.api_keys import hash_key, key_id_of, key_matches, new_api_key
from services.edge.auth.policy import required_scope
from services.edge.config import EdgeConfig, config_problems, parse_args
from services.edge.auth.jwt_tokens import JwtVerifier, looks_like_jwt
from tests.auth_support import make_keys

REPO = Path(__file__).resolve().parents[2]


def test_keys_embed_their_id_and_match_only_their_hash():
    key_id, key = new_api_key()
    assert key_id_of(key) == key_id and key.startswith(f"cy-{key_id}.")
    assert key_matches(key, hash_key(key)) and not key_matches(key + "x", hash_key(key))
    assert new_api_key()[1] != key
    for other in ("", "cy-", "sk-abc", f"cy-{key_id}", "cy-XYZ.abc", "a.b.c"):
        assert key_id_of(other) is None
    assert not looks_like_jwt(key) and looks_like_jwt("eyJh.eyJz.c2ln")


@pytest.mark.parametrize(("method", "path", "scope"), [
    ("GET", "/healthz", None), ("GET", "/metrics", None),
    ("POST", "/v1/chat/completions", Scope.INFERENCE), ("POST", "/v1/completions", Scope.INFERENCE),
    ("GET", "/v1/models", Scope.INFERENCE), ("GET", "/v1/models/Qwen/Qwen2.5-7B", Scope.INFERENCE),
    ("POST", "/tokenize", Scope.INFERENCE), ("POST", "/detokenize", Scope.INFERENCE),
    ("POST", "/tokenizex", Scope.ADMIN),
    ("POST", "/v1/models/load", Scope.ADMIN), ("DELETE", "/v1/models/m", Scope.ADMIN),
    ("GET", "/v1/system/health", Scope.ADMIN), ("POST", "/v1/cluster/strategy", Scope.ADMIN),
    ("POST", "/v1/fine_tuning/jobs", Scope.TRAINING), ("POST", "/v1/files", Scope.TRAINING),
    ("GET", "/api/v1/training/x", Scope.TRAINING),
    ("GET", "/v1/modelsx", Scope.ADMIN), ("GET", "/somewhere/new", Scope.ADMIN),  # unlisted: fail closed
])
def test_scope_table(method, path, scope):
    assert required_scope(method, path) == scope


def test_admin_implies_every_scope():
    assert all(grants(["admin"], s) for s in Scope)
    assert grants(["inference"], Scope.INFERENCE) and not grants(["inference"], Scope.TRAINING)


def test_jwt_scopes_from_string_list_or_custom_claim(tmp_path):
    keys = make_keys(tmp_path)
    verifier = JwtVerifier(EdgeConfig(auth="jwt", jwt_secret_file=str(keys.secret_file)))
    assert verifier.algorithms == ["HS256"]
    assert verifier.scopes({"scope": "inference training"}) == ["inference", "training"]
    assert verifier.scopes({"scopes": ["admin"]}) == ["admin"]
    assert verifier.scopes({}) == [] and verifier.scopes({"scope": 3}) == []
    custom = JwtVerifier(EdgeConfig(auth="jwt", jwt_public_key_file=str(keys.public_key_file),
                                    jwt_scope_claim="permissions"))
    assert custom.algorithms == ["RS256", "ES256"]
    assert custom.scopes({"permissions": ["training"], "scope": "admin"}) == ["training"]


def test_auth_flags_parse_into_the_strict_config(tmp_path):
    keys = make_keys(tmp_path)
    config = parse_args(["--host", "0.0.0.0", "--auth", "keys+jwt", "--jwt-secret-file", str(keys.secret_file),
                         "--jwt-public-key-file", str(keys.public_key_file),
                         "--jwt-algorithms", "HS256, ES256", "--jwt-audience", "a", "--jwt-issuer", "i",
                         "--jwt-scope-claim", "perms", "--auth-cache-ttl", "2"])
    assert (config.auth, config.jwt_algorithms, config.jwt_audience, config.jwt_issuer) == \
        ("keys+jwt", ["HS256", "ES256"], "a", "i")
    assert (config.jwt_scope_claim, config.auth_cache_ttl) == ("perms", 2.0)
    assert parse_args([]).auth == "none"


def test_jwt_settings_that_cannot_work_are_refused(tmp_path):
    keys = make_keys(tmp_path)
    secret_only = {"auth": "jwt", "jwt_secret_file": str(keys.secret_file)}
    assert config_problems(EdgeConfig(**secret_only)) == []
    assert "not supported" in config_problems(EdgeConfig(**secret_only, jwt_algorithms=["none"]))[0]
    assert "needs --jwt-public-key-file" in config_problems(EdgeConfig(**secret_only, jwt_algorithms=["RS256"]))[0]
    assert "no such file" in config_problems(EdgeConfig(auth="jwt", jwt_public_key_file=str(tmp_path / "x.pem")))[0]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_may_run_open(host):
    assert config_problems(EdgeConfig(host=host)) == []


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "192.168.1.10", "example.com"])
def test_anything_else_needs_auth(host):
    assert "without authentication" in config_problems(EdgeConfig(host=host))[0]
    assert config_problems(EdgeConfig(host=host, auth="keys")) == []


def test_edge_refuses_to_start_on_all_interfaces_without_auth():
    result = subprocess.run([sys.executable, "-m", "services.edge", "--host", "0.0.0.0", "--auth", "none",
                             "--nats-url", "nats://127.0.0.1:1"], cwd=REPO, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode != 0
    assert "refusing to serve on 0.0.0.0 without authentication" in result.stderr
    assert "--auth keys" in result.stderr and "./cy keys create" in result.stderr and "--jwt-secret-file" in \
        result.stderr


def test_jwt_auth_without_a_key_refuses_to_start():
    result = subprocess.run([sys.executable, "-m", "services.edge", "--auth", "jwt"], cwd=REPO,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--jwt-secret-file or --jwt-public-key-file" in result.stderr
