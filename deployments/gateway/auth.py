"""API keys, scopes and the FastAPI security dependencies.

A key is `br-` + 43 url-safe characters: 256 bits from `secrets`. The key store keeps only
`sha256:<hex>` of each key, never the key. A plain (unsalted, fast) sha256 is enough for keys like these,
unlike for passwords: salts and slow hashes (bcrypt, argon2) exist to stop dictionary and precomputed-table
attacks on guessable secrets, and a uniformly random 256-bit secret has no dictionary; finding a preimage
of sha256 is 2^256 work, and a slow hash would cost every request a few milliseconds for nothing. Lookup is
a dict lookup on the sha256 of the presented key: its timing can only say something about that hash,
which is no help in finding a key.

Key store (YAML or JSON, written by `banditrouter keys create`):

    keys:
      - id: team-a                      # public name: logs, metrics, budgets, the decision's owner
        hash: "sha256:<64 hex>"
        scopes: [route]                 # route: chat, models, feedback on its own decisions; admin: everything
        budget: {usd: 5.0, period: day} # optional: hour | day | week | month | total | "<N>s" (N >= 10)
        rate_limit_per_min: 60          # optional
      - id: team-b
        hash: "sha256:<64 hex>"
        scopes: [route]
        budget: {usd: 20.0, period: week, pacing: zcl}  # pacing: hard (default: 429 at the limit) | zcl

`pacing: zcl` paces a routed request's model choice so the budget lasts the period (deployments/gateway/budgets.py,
banditrouter/pacing.py); it needs a period that ends (not total).

loaded from `gateway.auth.keys_file` and/or the text of the environment variable `gateway.auth.keys_env`
(both: merged; an id or a hash in both is refused). The file is re-read when it changes (checked at most
every `reload_every_s`), so a new or revoked key takes effect without a restart.

The dependencies (`require_route`, `require_admin`, `optional_principal`) use `HTTPBearer`, so the OpenAPI
schema declares bearer auth; they find the store at `request.app.state.keystore`. They are module-level
functions with real (not postponed) annotations: Serve pickles the app, and a closure pickled by value
would lose the globals FastAPI needs to read string annotations (`request` would become a query parameter).
"""

import hashlib
import logging
import math
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deployments.gateway.errors import ApiError
from deployments.gateway.periods import CALENDAR_PERIODS, PERIOD_HELP, check_period

if TYPE_CHECKING:
    from banditrouter.config import AuthConfig

log = logging.getLogger(__name__)

SCOPES = ("route", "admin")
PERIODS = CALENDAR_PERIODS
PACING = ("hard", "zcl")
KEY_PREFIX = "br-"
MAX_KEY_CHARS = 512
"""A presented key longer than this is refused without hashing it."""


# ---------------------------------------------------------------------------------------------------------
# principals
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Budget:
    usd: float
    period: str
    """hour | day | week | month | total | "<N>s" (deployments/gateway/periods.py)."""
    pacing: Literal["hard", "zcl"] = "hard"
    """hard: 429 at the limit; zcl: routed requests are paced (ZCL knapsack) so the budget lasts the period."""


@dataclass(frozen=True)
class Principal:
    """Who is calling. `key_id` None: auth is off (the anonymous principal, every scope)."""

    key_id: str | None
    scopes: frozenset[str]
    budget: Budget | None = None
    rate_limit_per_min: int | None = None

    def has(self, scope: str) -> bool:
        """admin implies route."""
        return scope in self.scopes or "admin" in self.scopes


ANONYMOUS = Principal(None, frozenset(SCOPES), None, None)
"""Every caller under `auth.mode: none` (allowed only on a loopback bind)."""


# ---------------------------------------------------------------------------------------------------------
# the key store file (validated at the edge)
# ---------------------------------------------------------------------------------------------------------
class KeyStoreError(ValueError):
    """A key store that cannot be used; the message names the source and the bad entry."""


class _BudgetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    usd: float = Field(..., ge=0, description="Limit on spend per period, USD (never exceeded, either pacing).")
    period: str = Field(..., description=f"Budget window: {PERIOD_HELP}.")
    pacing: Literal["hard", "zcl"] = Field(
        "hard", description="hard: 429 at the limit; zcl: pace routed requests so the budget lasts the period."
    )

    @field_validator("usd")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("period")
    @classmethod
    def _period(cls, v: str) -> str:
        return check_period(v)

    @model_validator(mode="after")
    def _zcl_needs_an_end(self):
        if self.pacing == "zcl" and self.period == "total":
            raise ValueError("pacing zcl needs a period that ends (hour, day, week, month or '<N>s'); 'total' never does")
        return self


class KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="Public key id.")
    hash: str = Field(..., pattern=r"^sha256:[0-9a-f]{64}$", description="sha256 of the key, 'sha256:<hex>'.")
    scopes: list[Literal["route", "admin"]] = Field(..., min_length=1, description="What the key may do.")
    budget: _BudgetIn | None = Field(None, description="Spend limit per period, and how it is kept (pacing).")
    rate_limit_per_min: int | None = Field(None, ge=1, description="Requests per minute.")
    created: str | None = Field(None, description="When `keys create` made it (informational).")

    def principal(self) -> Principal:
        b = self.budget
        budget = Budget(b.usd, b.period, b.pacing) if b is not None else None
        return Principal(self.id, frozenset(self.scopes), budget, self.rate_limit_per_min)


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: list[KeyEntry] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self):
        _check_unique(self.keys, "")
        return self


def _check_unique(entries: list[KeyEntry], where: str) -> None:
    for attr in ("id", "hash"):
        seen = [getattr(e, attr) for e in entries]
        dup = sorted({v for v in seen if seen.count(v) > 1})
        if dup:
            raise KeyStoreError(f"{where}key {attr}s must be unique; repeated: {dup if attr == 'id' else len(dup)}")


def hash_key(secret: str) -> str:
    """The stored form of a key: 'sha256:<hex>'."""
    return "sha256:" + hashlib.sha256(secret.encode("utf-8", "replace")).hexdigest()


def new_key() -> str:
    """A fresh key: the prefix and 256 random bits (url-safe base64)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def parse_key_store(text: str, source: str) -> list[KeyEntry]:
    """Validate a key store's YAML/JSON text; `source` names it in errors. Empty text: no keys."""
    import yaml

    try:
        raw = yaml.safe_load(text) if text.strip() else {"keys": []}
    except yaml.YAMLError as e:
        raise KeyStoreError(f"{source}: not valid YAML/JSON: {e}") from None
    if raw is None:
        raw = {"keys": []}
    if not isinstance(raw, dict):
        raise KeyStoreError(f"{source}: expected a mapping with a 'keys:' list at the top level")
    try:
        return KeyFile.model_validate(raw).keys
    except KeyStoreError as e:
        raise KeyStoreError(f"{source}: {e}") from None
    except ValidationError as e:
        lines = [f"{source}: invalid key store"]
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            got = "" if err["loc"] and err["loc"][-1] == "hash" else f" (got {err.get('input')!r:.60})"
            lines.append(f"  {where}: {err['msg']}{got}")
        raise KeyStoreError("\n".join(lines)) from None


def read_key_file(path: Path) -> list[KeyEntry]:
    """A key store file's entries; a missing file has none."""
    if not path.exists():
        return []
    return parse_key_store(path.read_text(), str(path))


def _write_key_file(path: Path, entries: list[KeyEntry]) -> None:
    """All or nothing: written aside, then renamed over the old file; readable by its owner only."""
    import yaml

    body = {"keys": [e.model_dump(exclude_none=True) for e in entries]}
    text = (
        "# banditrouter key store: key hashes only (the keys were shown once by `banditrouter keys create`).\n"
        + yaml.safe_dump(body, sort_keys=False)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create_key(
    path: Path,
    key_id: str,
    scopes: list[str],
    *,
    budget_usd: float | None = None,
    period: str = "day",
    pacing: str = "hard",
    rate_limit_per_min: int | None = None,
) -> tuple[str, KeyEntry]:
    """Make a key, append its hash to the store at `path` (created if missing) and return (key, entry).
    The key itself is returned once and stored nowhere."""
    if pacing not in PACING:
        raise KeyStoreError(f"invalid key: pacing must be one of {PACING}, got {pacing!r}")
    if budget_usd is None and pacing != "hard":
        raise KeyStoreError(f"pacing {pacing!r} paces a budget: give the key one (--budget-usd)")
    entries = read_key_file(path)
    if any(e.id == key_id for e in entries):
        raise KeyStoreError(f"{path}: a key with id {key_id!r} already exists (revoke it first, or pick another id)")
    secret = new_key()
    raw = {
        "id": key_id,
        "hash": hash_key(secret),
        "scopes": sorted(set(scopes), key=SCOPES.index) if set(scopes) <= set(SCOPES) else scopes,
        "rate_limit_per_min": rate_limit_per_min,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if budget_usd is not None:
        raw["budget"] = {"usd": budget_usd, "period": period, "pacing": pacing}
    try:
        entry = KeyEntry.model_validate(raw)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise KeyStoreError(f"invalid key: {msgs}") from None
    _write_key_file(path, [*entries, entry])
    return secret, entry


def revoke_key(path: Path, key_id: str) -> KeyEntry:
    """Remove a key from the store at `path`; returns the removed entry."""
    entries = read_key_file(path)
    gone = [e for e in entries if e.id == key_id]
    if not gone:
        raise KeyStoreError(f"{path}: no key with id {key_id!r} (ids: {[e.id for e in entries]})")
    _write_key_file(path, [e for e in entries if e.id != key_id])
    return gone[0]


# ---------------------------------------------------------------------------------------------------------
# the store the ingress holds
# ---------------------------------------------------------------------------------------------------------
class KeyStore:
    """hash -> Principal. `mode` "none": everyone is ANONYMOUS (config validation allows it only on loopback)."""

    def __init__(
        self,
        mode: Literal["none", "keys"] = "keys",
        env_entries: list[KeyEntry] | None = None,
        keys_file: Path | None = None,
        *,
        reload_every_s: float = 2.0,
        clock=time.monotonic,
    ):
        self.mode, self.keys_file = mode, keys_file
        self._env_entries = list(env_entries or [])
        self.reload_every_s, self._clock = reload_every_s, clock
        self._file_stamp: tuple[int, int] | None = None
        self._checked = clock()
        self._by_hash: dict[str, Principal] = {}
        self._install(self._read_file())

    @classmethod
    def from_config(cls, auth: "AuthConfig", base_dir: Path | None = None, environ=None) -> "KeyStore":
        """The store `auth` names. A relative keys_file resolves against `base_dir` (load_config already
        resolves it against the config file's folder). Raises KeyStoreError when mode is keys and no key
        could be loaded, so a gateway never starts locked to everyone by mistake."""
        if auth.mode == "none":
            return cls("none")
        environ = os.environ if environ is None else environ
        path = auth.keys_file
        if path is not None and not path.is_absolute():
            path = (base_dir or Path.cwd()) / path
        env_entries: list[KeyEntry] = []
        if auth.keys_env:
            text = environ.get(auth.keys_env)
            if text is None and path is None:
                raise KeyStoreError(
                    f"gateway.auth.keys_env: environment variable {auth.keys_env} is not set in this process; set it to"
                    f' the key store\'s text (export {auth.keys_env}="$(cat keys.yaml)") where Ray starts'
                )
            env_entries = parse_key_store(text or "", f"${auth.keys_env}")
        if path is not None and not path.exists() and not env_entries:
            raise KeyStoreError(
                f"gateway.auth.keys_file: {path} does not exist; create a key with "
                f"`banditrouter keys create --id NAME --scopes route --file {path}`"
            )
        store = cls("keys", env_entries, path)
        if not store._by_hash:
            sources = " and ".join(s for s in (str(path) if path else "", f"${auth.keys_env}" if auth.keys_env else "") if s)
            raise KeyStoreError(
                f"gateway.auth.mode is 'keys' but {sources} hold no key: every request would be refused. Create one with "
                "`banditrouter keys create --id NAME --scopes route --file keys.yaml`"
            )
        return store

    def _read_file(self) -> list[KeyEntry]:
        if self.keys_file is None:
            return []
        try:
            st = self.keys_file.stat()
        except FileNotFoundError:
            self._file_stamp = None
            return []
        self._file_stamp = (st.st_mtime_ns, st.st_size)
        return read_key_file(self.keys_file)

    def _install(self, file_entries: list[KeyEntry]) -> None:
        entries = [*file_entries, *self._env_entries]
        _check_unique(entries, f"{self.keys_file} + env: " if self.keys_file and self._env_entries else "")
        self._by_hash = {e.hash.removeprefix("sha256:"): e.principal() for e in entries}  # swapped whole

    def _maybe_reload(self) -> None:
        now = self._clock()
        if self.keys_file is None or now - self._checked < self.reload_every_s:
            return
        self._checked = now
        try:
            st = self.keys_file.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._file_stamp:
            return
        try:
            self._install(self._read_file())
            log.info("key store %s reloaded: %d keys", self.keys_file, len(self._by_hash))
        except KeyStoreError as e:  # a half-edited file must not lock everyone out: keep the keys we have
            log.warning("key store %s not reloaded, keeping the previous keys: %s", self.keys_file, e)

    def authenticate(self, key: str) -> Principal | None:
        """The principal of `key`, or None for an unknown key (always ANONYMOUS in mode none)."""
        if self.mode == "none":
            return ANONYMOUS
        self._maybe_reload()
        if not key or len(key) > MAX_KEY_CHARS:
            return None
        return self._by_hash.get(hash_key(key).removeprefix("sha256:"))

    def __len__(self) -> int:
        return len(self._by_hash)

    def ids(self) -> list[str]:
        return sorted(p.key_id for p in self._by_hash.values() if p.key_id)


# ---------------------------------------------------------------------------------------------------------
# FastAPI security dependencies
# ---------------------------------------------------------------------------------------------------------
bearer = HTTPBearer(
    auto_error=False,  # we answer 401 ourselves, in the gateway's error shape
    scheme_name="ApiKey",
    bearerFormat="br-<key>",
    description="An API key from `banditrouter keys create`, sent as `Authorization: Bearer <key>`.",
)


def _store(request: Request) -> KeyStore:
    store = getattr(request.app.state, "keystore", None)
    if store is None:  # a wiring bug: fail closed
        raise RuntimeError("app.state.keystore is not set: the ingress must build the KeyStore in __init__")
    return store


def _authenticate(request: Request, cred: HTTPAuthorizationCredentials | None) -> Principal:
    store = _store(request)
    if store.mode == "none":
        return ANONYMOUS
    if cred is None:
        raise ApiError(401, "missing API key: send `Authorization: Bearer <key>`", "authentication_error", "invalid_api_key")
    principal = store.authenticate(cred.credentials)
    if principal is None:
        raise ApiError(401, "invalid API key", "authentication_error", "invalid_api_key")
    return principal


def _with_scope(principal: Principal, scope: str) -> Principal:
    if not principal.has(scope):
        raise ApiError(
            403,
            f"this API key lacks the {scope!r} scope (it has {sorted(principal.scopes)})",
            "permission_error",
            "insufficient_scope",
        )
    return principal


async def require_route(request: Request, cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
    """Chat, models, feedback (on the caller's own decisions). → Principal, or ApiError 401 / 403."""
    return _with_scope(_authenticate(request, cred), "route")


async def require_admin(request: Request, cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
    """Learner endpoints, routing events, stats, full /health. → Principal, or ApiError 401 / 403."""
    return _with_scope(_authenticate(request, cred), "admin")


async def optional_principal(request: Request, cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal | None:
    """The caller's principal when it sent a valid key (ANONYMOUS under mode none), else None. Never raises
    (for /health, which answers everyone but says more to admins)."""
    try:
        return _authenticate(request, cred)
    except (ApiError, RuntimeError):
        return None
