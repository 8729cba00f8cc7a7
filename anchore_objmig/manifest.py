"""A run's manifest: everything that decides which bytes land where.

The host that starts a run records it in objmig_runs. A host that joins takes
the run's settings from it (compression, deletes, buckets, lease timings,
S3 timeouts) and uses its own config files only for credentials; if those
files name another place than the run's, it refuses to join.
"""

from dataclasses import replace

from anchore_objmig import __version__
from anchore_objmig.errors import UsageError

DEFAULT_LEASE_SECONDS = 30.0
# S3 settings that bound how long a write can stay in the air: a joiner
# adopts the run's, so the run's takeover time covers its writes too.
S3_TIMING = ("max_attempts", "connect_timeout", "read_timeout")
S3_TIMING_DEFAULTS = {"max_attempts": 5, "connect_timeout": 10.0, "read_timeout": 120.0}


def s3_timing(store):
    config = store.driver_config
    return {key: config.get(key, default) for key, default in S3_TIMING_DEFAULTS.items()}


def write_grace_seconds(stores):
    """The longest time a write or delete sent under a valid lease can still
    land: every attempt waiting out both timeouts, plus the backoff between
    attempts (botocore and awscrt back off at most 20 s per retry)."""
    grace = 0.0
    for store in stores:
        if store.driver_name != "s3":
            continue
        timing = s3_timing(store)
        attempts = int(timing["max_attempts"])
        grace = max(grace, attempts * (float(timing["connect_timeout"]) + float(timing["read_timeout"]))
                    + (attempts - 1) * 20)
    return grace


def build(source, dest, source_store, dest_store, options, dest_marker=None):
    """The manifest of a run from `source` to `dest` (drivers) with `options`;
    `dest_marker`: the token the run left in its destination (joiners check it)."""
    return {
        "version": __version__,
        "source": {**source.identity(), "section": source_store.key, "timing": timing_of(source_store)},
        "dest": {**dest.identity(), "section": dest_store.key, "timing": timing_of(dest_store)},
        "compression": {"enabled": dest_store.compression_enabled, "min_size_kbytes": dest_store.min_size_kbytes},
        "delete_source": options.delete_source,
        "buckets": list(options.buckets),
        "excluded": list(options.excluded),
        "from_analysis_archive": options.from_analysis_archive,
        "to_analysis_archive": options.to_analysis_archive,
        "lease_seconds": options.lease_seconds,
        "write_grace_seconds": write_grace_seconds([source_store, dest_store]),
        "dest_marker": dest_marker,
    }


def timing_of(store):
    return s3_timing(store) if store.driver_name == "s3" else None


IDENTITY_SKIP = ("section", "timing")  # adopted from the run, not compared


def differences(run_manifest, mine):
    """How this host's view of the locations differs from the run's: one
    phrase per difference, empty when it may join."""
    found = []
    if run_manifest.get("version") != mine["version"]:
        found.append(f"anchore-objmig version {mine['version']} here, {run_manifest.get('version')} in the run")
    for side, label in (("source", "source"), ("dest", "destination")):
        theirs, ours = run_manifest.get(side) or {}, mine[side]
        for key in sorted(set(theirs) | set(ours)):
            if key in IDENTITY_SKIP or theirs.get(key) == ours.get(key):
                continue
            found.append(f"{label} {key} is {ours.get(key)!r} here but {theirs.get(key)!r} in the run")
    for key in ("from_analysis_archive", "to_analysis_archive"):
        theirs, ours = bool(run_manifest.get(key)), bool(mine[key])
        if theirs != ours:
            found.append(f"--{key.replace('_', '-')} is {'set' if ours else 'not set'} here but "
                         f"{'set' if theirs else 'not set'} in the run")
    return found


def check_join(run_manifest, mine, task_id):
    """Refuse (exit 2) to join a run whose locations differ from this host's."""
    problems = differences(run_manifest or {}, mine)
    if problems:
        raise UsageError(f"cannot join migration task {task_id}: " + "; ".join(problems))


def adopt(run_manifest, options, source_store, dest_store):
    """The options and stores a joiner works with: the run's settings, this
    host's credentials."""
    compression = run_manifest["compression"]
    dest_store = replace(
        with_timing(dest_store, run_manifest["dest"].get("timing")),
        compression_enabled=compression["enabled"],
        min_size_kbytes=compression["min_size_kbytes"],
    )
    source_store = with_timing(source_store, run_manifest["source"].get("timing"))
    options = replace(
        options,
        delete_source=run_manifest["delete_source"],
        buckets=tuple(run_manifest["buckets"] or ()),
        excluded=tuple(run_manifest.get("excluded") or ()),
        lease_seconds=run_manifest["lease_seconds"],
    )
    return options, source_store, dest_store


def with_timing(store, timing):
    if not timing:
        return store
    return replace(store, driver_config={**store.driver_config, **timing})
