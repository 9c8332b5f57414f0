"""Settings kept in the database's `settings` table; secret ones encrypted with Fernet.

The key comes from EMBEDQ_SECRET_KEY and never from the database, so a database dump alone
does not reveal provider keys.
"""

from __future__ import annotations

import json
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from pydantic import SecretStr, TypeAdapter

from embedq.db import describe_target
from embedq.errors import ConfigurationError
from embedq.jobs import JobStore
from embedq.settings import Settings, is_bootstrap, is_secret

MASK = "********"


def generate_key() -> str:
    return Fernet.generate_key().decode()


def fernet(
    settings: Settings,
    what: str = "secret settings",
    where: str = "everywhere embedq runs, and try again",
) -> Fernet:
    """The cipher of secrets kept in the database (settings, webhook secrets): keyed by
    EMBEDQ_SECRET_KEY, which never is, so a dump alone reveals nothing."""
    if settings.secret_key is None:
        raise ConfigurationError(
            f"{what} are stored encrypted and EMBEDQ_SECRET_KEY is not set. Generate a key "
            f"with `embedq settings gen-key` and set EMBEDQ_SECRET_KEY to it {where}."
        )
    try:
        return Fernet(settings.secret_key.get_secret_value().encode())
    except ValueError:
        raise ConfigurationError(
            "EMBEDQ_SECRET_KEY is not a valid Fernet key (32 url-safe base64-encoded bytes). "
            "Generate one with `embedq settings gen-key`."
        ) from None


def parse_value(name: str, raw: str) -> Any:
    """A value typed on the command line, checked against the setting's type."""
    if name not in Settings.model_fields:
        known = ", ".join(sorted(Settings.model_fields))
        raise ConfigurationError(f"unknown setting {name!r}; known settings: {known}")
    if is_bootstrap(name):
        raise ConfigurationError(
            f"setting {name!r} is needed before the database can be read, so it cannot be "
            f"stored there; set it in the environment (EMBEDQ_{name.upper()}) or with a flag"
        )
    field = Settings.model_fields[name]
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    # A text setting keeps what was typed ("123" stays a string); others parse as JSON.
    if str in getattr(field.annotation, "__args__", (field.annotation,)) and not isinstance(
        value, str | list
    ):
        value = raw
    try:
        Settings.load(database={name: value})
    except ConfigurationError as exc:
        raise ConfigurationError(str(exc).replace("(from database)", "(given)")) from None
    return TypeAdapter(Any).dump_python(value, mode="json")


async def load(store: JobStore, settings: Settings) -> dict[str, Any]:
    """The stored values, secrets decrypted (when they are present)."""
    out: dict[str, Any] = {}
    for row in await store.fetch("settings_all"):
        value = row["value"]
        if row["encrypted"]:
            try:
                value = fernet(settings).decrypt(str(value).encode()).decode()
            except InvalidToken:
                raise ConfigurationError(
                    f"stored secret {row['name']!r} cannot be decrypted with this "
                    "EMBEDQ_SECRET_KEY; set the key it was stored with, or store it again "
                    f"with `embedq settings set {row['name']} ...`"
                ) from None
        out[row["name"]] = value
    return out


async def set_value(store: JobStore, settings: Settings, name: str, raw: str) -> None:
    value = parse_value(name, raw)
    encrypted = is_secret(name)
    if encrypted:
        value = fernet(settings).encrypt(str(value).encode()).decode()
    await store.fetch(
        "settings_set", {"name": name, "value": json.dumps(value), "encrypted": encrypted}
    )


async def unset_value(store: JobStore, name: str) -> bool:
    if name not in Settings.model_fields:
        raise ConfigurationError(f"unknown setting {name!r}")
    return bool(await store.fetch("settings_unset", {"name": name}))


def shown(settings: Settings, name: str) -> Any:
    """A setting's value fit to print: secrets masked, paths and lists as plain JSON."""
    value = getattr(settings, name)
    if value is None:
        return None
    if name == "database_url":
        return describe_target(value.get_secret_value())
    if is_secret(name) or isinstance(value, SecretStr):
        return MASK
    return TypeAdapter(Any).dump_python(value, mode="json")
