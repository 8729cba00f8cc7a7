"""Read the object-store sections of an Anchore config.yaml.

Anchore substitutes every ``${ANCHORE...}`` in the file with an environment
variable before parsing the YAML; we do the same, so one config file serves
both Anchore and this tool. Values may also come from the file named by
``ANCHORE_ENV_FILE`` (``KEY=value`` lines); the process environment wins over
that file. A placeholder whose variable is unset is an error only inside the
section the tool reads (Anchore itself only warns; a config copied out of a
pod has dozens of placeholders for keys this tool never uses).

The section is checked strictly: an unknown or misplaced key is an error with
a suggestion, because a typo would otherwise silently select the default db
driver. Every problem is raised as a one-line ConfigError naming the file and
the key, never echoing a value (it could be a secret typed into the wrong key).
"""

import difflib
import logging
import os
import re
from dataclasses import dataclass, field

import yaml

from anchore_objmig.errors import ConfigError

log = logging.getLogger(__name__)

PLACEHOLDER = re.compile(r"\$\{(ANCHORE[A-Za-z0-9_]*)\}")
CATALOG_KEY = "services.catalog"
MAIN_SECTION = "object_store"
LEGACY_MAIN_SECTION = "archive"
ANALYSIS_SECTION = "analysis_archive"
DEFAULT_MIN_SIZE_KBYTES = 100
STORE_SECTIONS = (MAIN_SECTION, LEGACY_MAIN_SECTION, ANALYSIS_SECTION)
SECTION_KEYS = ("enabled", "compression", "storage_driver")
COMPRESSION_KEYS = ("enabled", "min_size_kbytes")
STORAGE_DRIVER_KEYS = ("name", "config")
# Anchore's own keys for each driver's config, plus the s3 extras this tool
# documents (max_attempts ... verify). Unknown driver names are refused later.
DRIVER_KEYS = {
    "db": (),
    "db2": (),
    "localfs": ("archive_data_dir",),
    "s3": ("access_key", "secret_key", "iamauto", "url", "region", "bucket", "prefix", "create_bucket",
           "max_attempts", "connect_timeout", "read_timeout", "ca_bundle", "verify"),
}
_warned_unset = []  # at most one warning per process about placeholders the tool does not use


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


def substitute(text, values):
    """Replace the ${ANCHORE...} placeholders whose variable is set; leave the others
    as written, for `check_placeholders` to judge by where they are."""

    def replace(match):
        return values.get(match.group(1), match.group(0))

    return PLACEHOLDER.sub(replace, text)


def check_placeholders(node, path, key):
    """An unset placeholder left inside the section the tool reads is an error."""
    if isinstance(node, dict):
        for name, value in node.items():
            check_placeholders(value, path, f"{key}.{name}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            check_placeholders(value, path, f"{key}[{index}]")
    elif isinstance(node, str):
        match = PLACEHOLDER.search(node)
        if match:
            name = match.group(1)
            raise ConfigError(path, key, f"${{{name}}} is used but the environment variable {name} is not set")


def warn_unused_placeholders(text, values, path):
    """One warning per process for unset placeholders outside the section we read."""
    unset = sorted({name for name in PLACEHOLDER.findall(text) if name not in values})
    if unset and not _warned_unset:
        _warned_unset.append(path)
        shown = ", ".join(unset[:5]) + (f" and {len(unset) - 5} more" if len(unset) > 5 else "")
        log.warning("%s: %d ${ANCHORE_*} placeholders have no value (%s); this tool does not use those keys",
                    path, len(unset), shown)


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


def suggestion(name, known):
    """ (did you mean X?) or the known keys, for an unknown key `name`."""
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]}?"
    return "known keys: " + (", ".join(known) if known else "none")


def check_keys(mapping, known, path, key):
    for name in mapping:
        if name not in known:
            raise ConfigError(path, f"{key}.{name}", f"unknown key ({suggestion(name, known)})")


def check_section_keys(section, path, key):
    """Every key of a store section, its compression, storage_driver and driver config."""
    check_keys(section, SECTION_KEYS, path, key)
    if isinstance(section.get("compression"), dict):
        check_keys(section["compression"], COMPRESSION_KEYS, path, f"{key}.compression")
    driver = section.get("storage_driver")
    if isinstance(driver, dict):
        check_keys(driver, STORAGE_DRIVER_KEYS, path, f"{key}.storage_driver")
        name = driver.get("name")
        if isinstance(name, str) and name.strip() in DRIVER_KEYS and isinstance(driver.get("config"), dict):
            check_keys(driver["config"], DRIVER_KEYS[name.strip()], path, f"{key}.storage_driver.config")


def find_misplaced(node, where, path):
    """A store section anywhere but services.catalog: an indentation mistake."""
    if not isinstance(node, dict):
        return
    for name, value in node.items():
        here = f"{where}.{name}" if where else str(name)
        looks_like_store = name in (MAIN_SECTION, ANALYSIS_SECTION) or (
            name == LEGACY_MAIN_SECTION and isinstance(value, dict) and "storage_driver" in value)
        if looks_like_store and where != CATALOG_KEY:
            raise ConfigError(path, here, f"a store section outside {CATALOG_KEY} (check its indentation); "
                              f"it must be {CATALOG_KEY}.{name}")
        if where == CATALOG_KEY and name in STORE_SECTIONS:
            continue  # the sections themselves are checked key by key
        find_misplaced(value, here, path)


def check_catalog(catalog, path, analysis_archive):
    """A catalog key that is a near miss for the wanted section, when that is absent."""
    wanted = (ANALYSIS_SECTION,) if analysis_archive else (MAIN_SECTION, LEGACY_MAIN_SECTION)
    if any(name in catalog for name in wanted):
        return
    for name in catalog:
        if name in STORE_SECTIONS:
            continue
        close = difflib.get_close_matches(str(name), wanted, n=1, cutoff=0.75)
        if close:
            raise ConfigError(path, f"{CATALOG_KEY}.{name}", f"unknown section (did you mean {close[0]}?)")


def as_bool(value, path, key):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return value.strip().lower() in ("true", "yes", "on", "1")
    raise ConfigError(path, key, "expected true or false")


def as_kbytes(value, path, key):
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(path, key, "expected a whole number of kilobytes") from None
    if number < 0 or isinstance(value, bool):
        raise ConfigError(path, key, "expected a whole number of kilobytes")
    return number


def build_section(section, raw_section, path, key):
    """The StoreConfig of a section; None means absent: Anchore's default, db."""
    if section is None:
        section = {"storage_driver": {"name": "db", "config": {}}}
    if not isinstance(section, dict):
        raise ConfigError(path, key, "must be a mapping")
    check_keys(section, SECTION_KEYS, path, key)
    compression = section.get("compression") or {}
    if not isinstance(compression, dict):
        raise ConfigError(path, f"{key}.compression", "must be a mapping")
    check_keys(compression, COMPRESSION_KEYS, path, f"{key}.compression")
    compression_enabled = as_bool(compression.get("enabled", False), path, f"{key}.compression.enabled")
    min_size_kbytes = as_kbytes(
        compression.get("min_size_kbytes", DEFAULT_MIN_SIZE_KBYTES), path, f"{key}.compression.min_size_kbytes"
    )
    driver = section.get("storage_driver")
    if driver is None:
        raise ConfigError(path, f"{key}.storage_driver", "missing (remove the whole section to use the default db driver)")
    if not isinstance(driver, dict):
        raise ConfigError(path, f"{key}.storage_driver", "must be a mapping")
    check_keys(driver, STORAGE_DRIVER_KEYS, path, f"{key}.storage_driver")
    name = driver.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(path, f"{key}.storage_driver.name", "missing (one of db, db2, s3, localfs)")
    driver_config = driver.get("config") or {}
    if not isinstance(driver_config, dict):
        raise ConfigError(path, f"{key}.storage_driver.config", "must be a mapping")
    if name.strip() in DRIVER_KEYS:
        check_keys(driver_config, DRIVER_KEYS[name.strip()], path, f"{key}.storage_driver.config")
    return StoreConfig(
        path=path,
        key=key,
        driver_name=name.strip(),
        driver_config=driver_config,
        compression_enabled=compression_enabled,
        min_size_kbytes=min_size_kbytes,
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
    values = {**read_env_file(environ), **environ}
    document = parse_yaml(substitute(text, values), path)
    catalog = catalog_of(document, path)
    find_misplaced(document, "", path)
    check_catalog(catalog, path, analysis_archive)
    name = section_name(catalog, analysis_archive)
    key = f"{CATALOG_KEY}.{name or MAIN_SECTION}"
    section = catalog.get(name) if name else None
    check_placeholders(section, path, key)
    for other in STORE_SECTIONS:  # a typo in the section not used now is still a typo
        if isinstance(catalog.get(other), dict):
            check_section_keys(catalog[other], path, f"{CATALOG_KEY}.{other}")
    if analysis_archive and name is None:
        raise ConfigError(path, f"{CATALOG_KEY}.{ANALYSIS_SECTION}", "missing or disabled, so there is no analysis archive to use")
    if name is not None and section is None:
        raise ConfigError(path, key, "is empty (give its storage_driver, or remove it to use the default db driver)")
    warn_unused_placeholders(text, values, path)
    if name is None:
        log.info("%s: %s is not set: using Anchore's default, the db driver (table archive_document)", path, key)
    store = build_section(section, raw_section_of(text, name), path, key)
    # Imported here: the driver registry imports this module.
    from anchore_objmig.drivers import validate_store

    validate_store(store)
    return store
