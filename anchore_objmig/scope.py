"""A complete account of a run's scope: the rows it cannot move, by cause.

The scope is every archive_metadata row of the selected logical buckets (all
without --bucket), but those stored at a location of the configs' *other*
section (the analysis archive when moving the main store, and the reverse):
those belong to that section's own migration. A row in scope is at the
destination, at the source (moved, or failed and named), or somewhere this
run cannot move it from: no URL, a driver this tool does not support, a
scheme nobody knows, or another location. Rows at the source with no digest,
no size (and, from S3, maybe no MD5 ETag) are "unverifiable": they move, but
nothing proves what was read is whole.
"""

import logging
from dataclasses import dataclass

from psycopg import sql

from anchore_objmig.config import load_store_config
from anchore_objmig.drivers import DRIVERS, UNSUPPORTED, DriverContext, make_driver
from anchore_objmig.errors import ObjmigError

log = logging.getLogger(__name__)

EXAMPLES = 5
KNOWN_SCHEMES = sorted({driver.scheme for driver in DRIVERS.values()})
HINTS = {
    "no URL": "their content_url is NULL: Anchore cannot read them either; restore the documents or delete "
              "the rows if they are no longer needed",
    "unsupported driver": "stored by a driver anchore-objmig does not support (e.g. swift): move them with "
                          "anchore-manager objectstorage migrate first",
    "unknown scheme": "their content_url has a scheme no Anchore driver writes: find out what wrote them "
                      "before switching the config",
    "another location": "stored by a supported driver at a location that is neither this run's source nor its "
                        "destination: migrate them with a FROM_CONFIG naming that location",
    "unverifiable": "no digest or size to check the bytes read against (rows from old Anchore versions); "
                    "they move, their metadata gets the digest and size of what was read, and they are named",
}
S3_UNVERIFIABLE_HINT = " (from S3, a plain MD5 ETag still proves them whole; only the others are named)"


@dataclass(frozen=True)
class Cause:
    name: str
    count: int
    examples: list

    @property
    def hint(self):
        return HINTS[self.name]


@dataclass(frozen=True)
class Account:
    causes: list  # Cause, rows in scope the run cannot move (or, for the plan, unverifiable)
    at_source: int  # rows in scope still at the source location

    @property
    def elsewhere(self):
        """Rows in scope not at the destination."""
        return self.at_source + sum(c.count for c in self.causes if c.name != "unverifiable")


def other_locations(options):
    """Locations of the configs' other sections (their rows are out of scope)."""
    found = []
    context = DriverContext()
    for path, analysis in ((options.from_config, not options.from_analysis_archive),
                           (options.to_config, not options.to_analysis_archive)):
        try:
            found.append(make_driver(load_store_config(path, analysis), context).location)
        except ObjmigError:
            continue  # no such section (e.g. no analysis archive): nothing to leave out
    return found


def nested_in(location, others):
    """The locations of `others` strictly inside `location`."""
    return tuple(sorted(other for other in others if other != location and other.startswith(location)))


def classify(source, dest, others):
    """SQL (on alias m): the cause of a row in scope, or 'dest' / 'source' / 'other section'.
    The longest location a URL begins with names it: an other section kept
    inside the source's location is that section's, not the source's."""
    unsupported = [f"{name}://" for name in UNSUPPORTED]
    known = [f"{scheme}://" for scheme in KNOWN_SCHEMES]
    places = sorted([(dest.location, "dest"), (source.location, "source"),
                     *((location, "other section") for location in others)], key=lambda place: -len(place[0]))
    cases = [sql.SQL("WHEN m.content_url IS NULL THEN 'no URL'")]
    cases += [sql.SQL("WHEN starts_with(m.content_url, {}) THEN {}").format(sql.Literal(location), sql.Literal(name))
              for location, name in places]
    cases += [sql.SQL("WHEN starts_with(m.content_url, {}) THEN 'unsupported driver'").format(sql.Literal(prefix))
              for prefix in unsupported]
    cases += [sql.SQL("WHEN starts_with(m.content_url, {}) THEN 'another location'").format(sql.Literal(prefix))
              for prefix in known]
    return sql.SQL("CASE {} ELSE 'unknown scheme' END").format(sql.SQL(" ").join(cases))


def account(conn, source, dest, options, unverifiable=False):
    """Count the rows in scope by where they are; examples of each cause."""
    others = [loc for loc in other_locations(options) if loc not in (source.location, dest.location)]
    where = sql.SQL("m.bucket = ANY({})").format(sql.Literal(list(options.buckets))) if options.buckets else sql.SQL("true")
    cause = classify(source, dest, others)
    if unverifiable:  # the plan: rows at the source nothing can check
        cause = sql.SQL("CASE WHEN {c} = 'source' AND nullif(btrim(m.digest), '') IS NULL AND m.size IS NULL THEN 'unverifiable' "
                        "ELSE {c} END").format(c=cause)
    query = sql.SQL(
        """SELECT cause, count(*), (array_agg(label) FILTER (WHERE n <= {examples}))
           FROM (SELECT cause, label, row_number() OVER (PARTITION BY cause) AS n
                 FROM (SELECT {cause} AS cause,
                              m."userId" || '/' || m.bucket || '/' || m."archiveId"
                                || coalesce(' (' || m.content_url || ')', '') AS label
                       FROM archive_metadata m WHERE {where}) rows
                 WHERE cause NOT IN ('dest', 'other section')) numbered
           GROUP BY cause ORDER BY cause"""
    ).format(examples=sql.Literal(EXAMPLES), cause=cause, where=where)
    causes, at_source = [], 0
    for name, count, examples in conn.execute(query):
        if name == "source":
            at_source = count
        else:
            causes.append(Cause(name, count, sorted(examples or [])))
    if unverifiable:  # the unverifiable rows are at the source too
        at_source += sum(c.count for c in causes if c.name == "unverifiable")
    return Account(causes, at_source)


def describe(cause, source):
    hint = cause.hint + (S3_UNVERIFIABLE_HINT if cause.name == "unverifiable" and source.scheme == "s3" else "")
    lines = [f"  {cause.name}: {cause.count} rows — {hint}"]
    lines += [f"    e.g. {example}" for example in cause.examples]
    if cause.count > len(cause.examples):
        lines.append(f"    ... and {cause.count - len(cause.examples)} more")
    return lines


def print_plan(conn, source, dest, options):
    """For the dry run: rows in scope this run cannot move, and the unverifiable ones."""
    result = account(conn, source, dest, options, unverifiable=True)
    if result.causes:
        print("rows in scope this run will not prove or cannot move:")
        for cause in result.causes:
            for line in describe(cause, source):
                print(line)
    return result


def drivers_of(options):
    """The run's source and destination drivers, for their locations only."""
    context = DriverContext()
    return (make_driver(load_store_config(options.from_config, options.from_analysis_archive), context),
            make_driver(load_store_config(options.to_config, options.to_analysis_archive), context))


def report(conn, options):
    """For the end of a run: what in scope is still not at the destination.
    Returns the Account; its `elsewhere` > 0 means the run is not complete."""
    source, dest = drivers_of(options)
    result = account(conn, source, dest, options)
    for cause in result.causes:
        for line in describe(cause, source):
            log.error("not movable by this run:%s", line[1:] if line.startswith("  ") else line)
    if result.elsewhere:
        where = ", ".join([f"{result.at_source} at the source"] * bool(result.at_source)
                          + [f"{c.count} {c.name}" for c in result.causes])
        log.error("%d rows in scope are not at the destination (%s): Anchore's config must not be switched yet",
                  result.elsewhere, where)
    return result
