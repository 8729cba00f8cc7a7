"""Read the object-store sections of an Anchore config.yaml.

Anchore substitutes every ``${ANCHORE...}`` in the file with an environment
variable before parsing the YAML; we do the same, so one config file serves
both Anchore and this tool. Values may also come from the file named by
``ANCHORE_ENV_FILE`` (``KEY=value`` lines); the process environment wins over
that file. Every problem is raised as a one-line ConfigError naming the file
and the key.
"""

import os
import re
from dataclasses import dataclass, field

import yaml

from anchore_objmig.errors import ConfigError

PLACEHOLDER = re.compile(r"\$\{(ANCHORE[A-Za-z0-9_]*)\}")
CATALOG_KEY = "services.catalog"
MAIN_SECTION = "object_store"
LEGACY_MAIN_SECTION = "archive"
ANALYSIS_SECTION = "analysis_archive"
DEFAULT_MIN_SIZE_KBYTES = 100


@dataclass(frozen=True)
class StoreConfig:
    """One object-store section: compression settings and a storage driver."""

    path: str  # the config file it came from
    key: str  # e.g. services.catalog.object_store
    driver_name: str
    driver_config: dict = field(hash=False)
    compression_enabled: bool = False
    min_size_kbytes: int = DEFAULT_MIN_SIZE_KBYTES
    # The section as written in the file, ${ANCHORE_*} placeholders intact:
    # what we show the operator at the end of a migration.
    as_written: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def compression_threshold(self):
        """Documents strictly longer than this many bytes are compressed."""
        return self.min_size_kbytes * 1024

    def error(self, key, problem):
        """A ConfigError about `key` inside this section's driver config."""
        return ConfigError(self.path, f"{self.key}.storage_driver.config.{key}", problem)


def read_env_file(environ):
    """Variables from the file named by ANCHORE_ENV_FILE, if any."""
    env_path = environ.get("ANCHORE_ENV_FILE")
    if not env_path:
        return {}
    try:
        with open(env_path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise ConfigError(env_path, "ANCHORE_ENV_FILE", f"cannot read: {exc.strerror}") from None
    values = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, value = line.split("=", 1)
        name = name.strip()
        if name.startswith("export "):
            name = name[len("export "):].strip()
        values[name] = value.strip().strip("'\"")
    return values


def substitute(text, path, environ):
    """Replace ${ANCHORE...} placeholders; an unset one is an error."""
    values = {**read_env_file(environ), **environ}

    def replace(match):
        name = match.group(1)
        if name not in values:
            line = text.count("\n", 0, match.start()) + 1
            raise ConfigError(path, f"line {line}", f"${{{name}}} is used but the environment variable {name} is not set")
        return values[name]

    return PLACEHOLDER.sub(replace, text)


def parse_yaml(text, path):
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(path, where, f"invalid YAML: {problem}") from None
    return document


def read_text(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        raise ConfigError(path, None, "no such file") from None
    except IsADirectoryError:
        raise ConfigError(path, None, "is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(path, None, "permission denied") from None
    except UnicodeDecodeError:
        raise ConfigError(path, None, "not a UTF-8 text file") from None
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read: {exc.strerror}") from None


def catalog_of(document, path):
    """The services.catalog mapping of a parsed config document."""
    if not isinstance(document, dict):
        raise ConfigError(path, None, "is not a YAML mapping (expected services.catalog)")
    services = document.get("services")
    if not isinstance(services, dict):
        raise ConfigError(path, "services", "missing (expected services.catalog)")
    catalog = services.get("catalog")
    if not isinstance(catalog, dict):
        raise ConfigError(path, CATALOG_KEY, "missing or not a mapping")
    return catalog


def section_name(catalog, analysis_archive):
    """Which key of services.catalog holds the wanted section, or None for defaults."""
    if analysis_archive:
        section = catalog.get(ANALYSIS_SECTION)
        if isinstance(section, dict) and section.get("enabled", True) is not False:
            return ANALYSIS_SECTION
        return None
    for name in (MAIN_SECTION, LEGACY_MAIN_SECTION):
        if name in catalog:
            return name
    return None


def as_bool(value, path, key):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return value.strip().lower() in ("true", "yes", "on", "1")
    raise ConfigError(path, key, f"expected true or false, got {value!r}")


def as_kbytes(value, path, key):
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(path, key, f"expected a whole number of kilobytes, got {value!r}") from None
    if number < 0 or isinstance(value, bool):
        raise ConfigError(path, key, f"expected a whole number of kilobytes, got {value!r}")
    return number


def build_section(section, raw_section, path, key):
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ConfigError(path, key, "must be a mapping")
    compression = section.get("compression") or {}
    if not isinstance(compression, dict):
        raise ConfigError(path, f"{key}.compression", "must be a mapping")
    driver = section.get("storage_driver")
    if driver is None:
        driver = {"name": "db", "config": {}}
    if not isinstance(driver, dict):
        raise ConfigError(path, f"{key}.storage_driver", "must be a mapping")
    name = driver.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(path, f"{key}.storage_driver.name", "missing (one of db, db2, s3, localfs)")
    driver_config = driver.get("config") or {}
    if not isinstance(driver_config, dict):
        raise ConfigError(path, f"{key}.storage_driver.config", "must be a mapping")
    return StoreConfig(
        path=path,
        key=key,
        driver_name=name.strip(),
        driver_config=driver_config,
        compression_enabled=as_bool(compression.get("enabled", False), path, f"{key}.compression.enabled"),
        min_size_kbytes=as_kbytes(
            compression.get("min_size_kbytes", DEFAULT_MIN_SIZE_KBYTES), path, f"{key}.compression.min_size_kbytes"
        ),
        as_written=raw_section if isinstance(raw_section, dict) else {},
    )


def raw_section_of(text, name):
    """The section as written (placeholders intact), or {} if that cannot be parsed."""
    try:
        catalog = catalog_of(yaml.safe_load(text), "")
    except (yaml.YAMLError, ConfigError):
        return {}
    return catalog.get(name) or {} if name else {}


def load_store_config(path, analysis_archive=False, environ=None):
    """The object_store (or analysis_archive) section of the config file at `path`."""
    environ = os.environ if environ is None else environ
    text = read_text(path)
    document = parse_yaml(substitute(text, path, environ), path)
    catalog = catalog_of(document, path)
    name = section_name(catalog, analysis_archive)
    if analysis_archive and name is None:
        raise ConfigError(path, f"{CATALOG_KEY}.{ANALYSIS_SECTION}", "missing or disabled, so there is no analysis archive to use")
    key = f"{CATALOG_KEY}.{name or MAIN_SECTION}"
    section = catalog.get(name) if name else None
    store = build_section(section, raw_section_of(text, name), path, key)
    # Imported here: the driver registry imports this module.
    from anchore_objmig.drivers import validate_store

    validate_store(store)
    return store
