"""The command line: the parser (also the man page's source) and dispatch."""

import argparse
import logging
import os
import re
import sys

from anchore_objmig import __version__, logs, toast
from anchore_objmig.cpus import usable_cpus
from anchore_objmig.errors import EXIT_FAILED, EXIT_SIGINT, EXIT_SIGTERM, EXIT_TABLE, EXIT_USAGE, ObjmigError, Terminated, UsageError

log = logging.getLogger("anchore_objmig")

DESCRIPTION = """\
Move Anchore's object-store documents (SBOMs, analysis reports, manifests,
policy evaluations) between storage backends: PostgreSQL (db, db2), S3 or
MinIO (s3) and local files (localfs). A drop-in replacement for
`anchore-manager objectstorage`: same commands and flags, but parallel,
resumable, and honest about failures. Anchore services must be stopped while
a migration runs; the database must be up."""

EPILOG = "exit status:\n" + "".join(f"  {code:<4} {meaning}\n" for code, meaning in EXIT_TABLE) + """
environment:
  ANCHORE_OBJMIG_DB_CONNECT  database URL when --db-connect is not given
  PGPASSWORD, PGPASSFILE     standard libpq password sources
  ANCHORE_*                  substituted into ${ANCHORE_*} placeholders of config files
  ANCHORE_ENV_FILE           a file of KEY=value lines read for those placeholders

anchore-manager runbooks work unchanged with only the program name replaced:
  anchore-objmig objectstorage --db-connect URL check|migrate|list-migrations ...
"""

GLOBAL_OPTIONS = ("--db-connect", "--db-use-ssl", "--db-sslmode", "--db-sslrootcert", "--db-retries", "--db-timeout",
                  "--db-connect-timeout", "--log-format", "-q", "--quiet", "-v", "--verbose", "--debug")
# argparse echoes a rejected value; it may be a secret given in the wrong place.
ECHOED_VALUE = re.compile(r"(invalid choice|invalid \w+ value): .*?(?=$| \(choose from)")
ECHOED_OPTION_VALUE = re.compile(r"(ambiguous option: [^=\s]*)=\S*")


def redact_argv_error(message):
    """An argparse error without any password or rejected value in it."""
    from anchore_objmig.db import redacted

    message = ECHOED_OPTION_VALUE.sub(r"\1=<value>", ECHOED_VALUE.sub(lambda match: match.group(1), message))
    return redacted(message)


def describe_extras(extras):
    """Unrecognized arguments as option names only: the value after an option is
    typically what it was given, e.g. a database URL with its password."""
    from anchore_objmig.db import redacted

    shown, after_option = [], False
    for token in extras:
        if token.startswith("-") and len(token) > 1:
            name = token.split("=", 1)[0]
            shown.append(name + ("=<value>" if "=" in token else ""))
            after_option = "=" not in token
        else:
            shown.append("<value>" if after_option else redacted(token))
            after_option = False
    misplaced = [token.split("=", 1)[0] for token in extras if token.split("=", 1)[0] in GLOBAL_OPTIONS]
    hint = f" ({misplaced[0]} is a global option: put it before the command)" if misplaced else ""
    return " ".join(shown) + hint


class Parser(argparse.ArgumentParser):
    """argparse, with every message that repeats the command line redacted."""

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.error("unrecognized arguments: " + describe_extras(extras))
        return parsed

    def error(self, message):
        if not message.startswith("unrecognized arguments: "):
            message = redact_argv_error(message)
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a number of seconds") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def bucket_name(text):
    if not text.strip():
        raise argparse.ArgumentTypeError("a logical bucket name must not be empty")
    return text


def parse_size(text):
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    factor = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        return int(float(number) * factor)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a size such as 8MiB") from None


def batch_bytes_size(text):
    value = parse_size(text)
    if value < 1024 * 1024:
        raise argparse.ArgumentTypeError("must be at least 1MiB")
    return value


def size_bytes(text):
    value = parse_size(text)
    if value < 5 * 1024 * 1024:
        raise argparse.ArgumentTypeError("must be at least 5MiB (the smallest S3 multipart part)")
    return value


def add_bucket_option(parser, example=""):
    parser.add_argument(
        "--bucket", action="append", type=bucket_name, default=[], metavar="NAME",
        help=f"only this logical bucket{example} (repeatable; not an S3 bucket)",
    )


def add_progress_option(parser):
    parser.add_argument(
        "--progress", choices=["auto", "bar", "log", "none"], default="auto",
        help="a live display redrawn in place (bar), a log line every few seconds (log), or nothing; "
        "auto: bar on a terminal, log otherwise (default)",
    )


def add_metrics_option(parser):
    parser.add_argument(
        "--metrics-file", metavar="PATH",
        help="write Prometheus text-format metrics here at the end, atomically (for node_exporter's textfile collector)",
    )


def add_database_options(database, suppress=False):
    """The database options; with `suppress`, unset ones leave the global values alone."""
    names = ("db_connect", "db_use_ssl", "db_sslmode", "db_sslrootcert", "db_retries", "db_timeout", "db_connect_timeout")
    defaults = dict.fromkeys(names, argparse.SUPPRESS) if suppress else {}
    database.add_argument(
        "--db-connect",
        metavar="URL",
        default=defaults.get("db_connect", os.environ.get("ANCHORE_OBJMIG_DB_CONNECT")),
        help="the Anchore catalog database: postgresql://user:pass@host:5432/db, the SQLAlchemy forms "
        "postgresql+pg8000:// and postgresql+psycopg2://, or a libpq keyword string "
        "(default: $ANCHORE_OBJMIG_DB_CONNECT). Leave the password out to use PGPASSWORD or ~/.pgpass",
    )
    database.add_argument("--db-use-ssl", action="store_true", default=defaults.get("db_use_ssl", False), help="require SSL (sslmode=require)")
    database.add_argument(
        "--db-sslmode",
        choices=["disable", "allow", "prefer", "require", "verify-ca", "verify-full"],
        default=defaults.get("db_sslmode"), help="libpq sslmode, e.g. verify-full with --db-sslrootcert (overrides --db-use-ssl)",
    )
    database.add_argument("--db-sslrootcert", metavar="FILE", default=defaults.get("db_sslrootcert"), help="CA certificate file to verify the server with")
    database.add_argument("--db-retries", type=int, default=defaults.get("db_retries", 3), metavar="N", help="connection attempts after the first (default 3)")
    database.add_argument(
        "--db-timeout", type=non_negative_float, default=defaults.get("db_timeout", 0), metavar="S",
        help="cancel any single statement running longer than S seconds; 0: no limit (default). "
             "Not applied to the statements streaming one large document (its COPY, the copy of its value), "
             "which last as long as its transfer",
    )
    database.add_argument("--db-connect-timeout", type=positive_int, default=defaults.get("db_connect_timeout", 10), metavar="S", help="seconds to wait for a connection (default 10)")


def build_parser():
    parser = Parser(
        prog="anchore-objmig",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    add_database_options(parser.add_argument_group("database (global options, before the command)"))
    output = parser.add_argument_group("output (global options, before the command)")
    output.add_argument("--log-format", choices=["text", "json"], default="text", help="log lines on stderr as text or one JSON object each (default text)")
    verbosity = output.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    verbosity.add_argument("-v", "--verbose", "--debug", action="store_true", help="log debugging detail")
    output.add_argument("--json", dest="manager_json", action="store_true", help=argparse.SUPPRESS)  # anchore-manager's; no effect

    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    add_commands(commands)
    add_objectstorage(commands)
    return parser


def add_objectstorage(commands):
    """anchore-manager's argument order: the database options after `objectstorage`."""
    objectstorage = commands.add_parser(
        "objectstorage",
        help="anchore-manager's form: objectstorage [--db-connect URL ...] check|migrate|list-migrations|list-drivers",
        description="The same commands in anchore-manager's argument order, so that a runbook only changes "
        "the program name: anchore-objmig objectstorage --db-connect URL migrate FROM_CONFIG TO_CONFIG.",
    )
    add_database_options(objectstorage.add_argument_group("database"), suppress=True)
    nested = objectstorage.add_subparsers(dest="command", metavar="COMMAND")
    nested.required = True
    add_commands(nested, manager_only=True)


def add_commands(commands, manager_only=False):
    """The commands; `manager_only`: just those anchore-manager objectstorage has."""
    check = commands.add_parser(
        "check",
        help="test a configuration: store, fetch and delete a test document",
        description="Write a test document (user test, bucket anchorecliconfigtest) through the configured "
        "object store, read it back, compare it, delete it and confirm it is gone.",
    )
    check.add_argument("config", metavar="CONFIG", help="an Anchore config.yaml")
    check.add_argument("--analysis-archive", action="store_true", help="check the analysis_archive section instead of object_store")

    migrate = commands.add_parser(
        "migrate",
        help="move every document from one configuration's store to another's",
        description="Move every document stored where FROM_CONFIG says to where TO_CONFIG says, rewrite "
        "its metadata row, then delete the source copy. Safe to interrupt: run the same command again "
        "to finish. Prints the section to put into config.yaml at the end.",
    )
    migrate.add_argument("from_config", metavar="FROM_CONFIG", help="config.yaml the services use now")
    migrate.add_argument("to_config", metavar="TO_CONFIG", help="config.yaml with the destination store")
    migrate.add_argument("--from-analysis-archive", action="store_true", help="take the source from FROM_CONFIG's analysis_archive section")
    migrate.add_argument("--to-analysis-archive", action="store_true", help="take the destination from TO_CONFIG's analysis_archive section")
    migrate.add_argument("--nodelete", action="store_true", help="keep the source copies (you remove them later)")
    migrate.add_argument("--dontask", action="store_true", help="do not ask for confirmation (for batch jobs)")
    migrate.add_argument(
        "--bucket", action="append", type=bucket_name, default=[], metavar="NAME",
        help="only this logical bucket, e.g. analysis_archive (repeatable; not an S3 bucket); "
        "a name with no document in archive_metadata is refused",
    )
    migrate.add_argument(
        "--all-buckets", action="store_true",
        help="with --to-analysis-archive and --dontask: really move every logical bucket into the analysis "
        "archive store (without it that is refused; the usual run has --bucket analysis_archive)",
    )
    migrate.add_argument(
        "--allow-empty", action="store_true",
        help="run even when FROM_CONFIG's location holds none of the selected documents "
        "(refused by default: it usually means the wrong config, section or --bucket)",
    )
    migrate.add_argument("--dry-run", action="store_true", help="print what would be moved (per bucket and user) and change nothing")
    migrate.add_argument(
        "--join", action="store_true",
        help="help a running migration from another host: the run's own settings apply (compression, --nodelete, "
        "--bucket), this host's config files give only the credentials and must name the same locations",
    )
    migrate.add_argument(
        "--lease-seconds", type=positive_float, default=30.0, metavar="S",
        help="a worker that has not confirmed its shard for S seconds stops writing; a silent worker's shard is "
        "taken over after S seconds plus the longest time its S3 writes can take (default 30)",
    )
    migrate.add_argument("--workers", type=positive_int, default=usable_cpus(), metavar="N",
                         help="worker processes (default: the CPUs this process may use, after its affinity and "
                         "cgroup quota)")
    migrate.add_argument("--io-threads", type=positive_int, default=32, metavar="N", help="network threads per worker (default 32)")
    migrate.add_argument("--batch-size", type=positive_int, default=500, metavar="N", help="documents per batch (default 500)")
    migrate.add_argument(
        "--batch-bytes", type=batch_bytes_size, default=32 * 1024 * 1024, metavar="SIZE",
        help="about this many decoded bytes per batch (default 32MiB; a compressed document counts as 20 times "
        "its stored size, a row without a size as measured; a document stored or decoding above it is streamed, not held whole)",
    )
    migrate.add_argument("--shard-size", type=positive_int, default=5000, metavar="N", help="at most N documents per shard (default 5000; fewer in a small run, so each worker has about 4 shards)")
    migrate.add_argument(
        "--multipart-threshold", type=size_bytes, default=32 * 1024 * 1024, metavar="SIZE",
        help="S3 documents larger than this go up in parts of 8MiB, or of SIZE if smaller (default 32MiB); "
        "documents streamed because they are too large to hold whole always go up in parts",
    )
    migrate.add_argument(
        "--toast-compression", choices=toast.CHOICES, default="lz4",
        help="how PostgreSQL compresses the documents written into it: lz4 (default, when the server has it; about 3 "
        "times faster to write than pglz, values read back the same) or the server's own default_toast_compression",
    )
    migrate.add_argument("--show-secrets", action="store_true", help="print secrets in the final configuration section instead of <redacted>")
    add_progress_option(migrate)
    add_metrics_option(migrate)

    list_migrations = commands.add_parser(
        "list-migrations", help="show the migration history", description="Show every migration task recorded in the database.")
    commands.add_parser("list-drivers", help="show the storage drivers", description="Show the storage drivers this tool can read and write.")
    if manager_only:
        migrate.set_defaults(json=False)  # anchore-manager's commands have no --json
        list_migrations.set_defaults(json=False)
        return

    verify = commands.add_parser(
        "verify",
        help="read back every document a configuration holds and check it",
        description="Read every document whose metadata row points into CONFIG's store, check its MD5 "
        "against the row's digest, its size, and that it decompresses when marked compressed. Read-only: "
        "nothing is written anywhere. Names every bad document on stderr; exit status 1 if there is one.",
    )
    verify.add_argument("config", metavar="CONFIG", help="an Anchore config.yaml")
    verify.add_argument("--analysis-archive", action="store_true", help="verify the analysis_archive section instead of object_store")
    add_bucket_option(verify)
    verify.add_argument("--workers", type=positive_int, default=usable_cpus(), metavar="N",
                        help="worker processes (default: the CPUs this process may use, after its affinity and "
                        "cgroup quota)")
    add_progress_option(verify)
    add_metrics_option(verify)
    add_output_and_cleanup(commands, migrate, verify, list_migrations)


def add_output_and_cleanup(commands, migrate, verify, list_migrations):
    """--json for the commands that report, and the cleanup command."""
    migrate.add_argument("--json", action="store_true",
                         help="with --dry-run: print the plan (by bucket and user, counts and stored bytes) as one JSON document")
    verify.add_argument("--json", action="store_true", help="print the counts and every bad document as one JSON document")
    list_migrations.add_argument("--json", action="store_true", help="print the history as one JSON document")
    cleanup = commands.add_parser(
        "cleanup",
        help="delete the old copies a migrate --nodelete left behind",
        description="Delete, from the store FROM_CONFIG configures, the old copies of documents that a recorded "
        "anchore-objmig migration moved elsewhere and that no metadata row references any more (what "
        "migrate --nodelete keeps). Nothing else there is touched: a copy that cannot be proved moved stays. "
        "Reports the copies and bytes freed.",
    )
    cleanup.add_argument("from_config", metavar="FROM_CONFIG", help="the config.yaml the migration moved the documents from")
    cleanup.add_argument("--from-analysis-archive", action="store_true", help="clean FROM_CONFIG's analysis_archive section's store")
    add_bucket_option(cleanup)
    cleanup.add_argument("--dry-run", action="store_true", help="print what would be deleted (copies and bytes) and change nothing")
    cleanup.add_argument("--dontask", action="store_true", help="do not ask for confirmation (for batch jobs)")


def db_settings(args):
    from anchore_objmig.db import DbSettings, to_conninfo

    sslmode = args.db_sslmode or ("require" if args.db_use_ssl else None)
    return DbSettings(
        conninfo=to_conninfo(args.db_connect),
        retries=max(0, args.db_retries),
        connect_timeout=args.db_connect_timeout,
        statement_timeout=args.db_timeout,
        sslmode=sslmode,
        sslrootcert=args.db_sslrootcert,
    )


def dispatch(args):
    if args.command == "list-drivers":
        from anchore_objmig.drivers import DRIVERS, UNSUPPORTED

        for name, driver in sorted(DRIVERS.items()):
            print(f"{name:8} {driver.scheme + '://':8} {driver.summary}")
        for name, why in UNSUPPORTED.items():
            print(f"{name:8} (refused) {why}")
        return 0
    if args.command == "check":
        from anchore_objmig import check

        return check.run(args.config, args.analysis_archive, db_settings(args))
    if args.command == "list-migrations":
        from anchore_objmig import db, tasks

        conn = db.connect(db_settings(args), autocommit=True)
        try:
            db.require_anchore_tables(conn)
            if args.json:
                from anchore_objmig.display import print_json

                print_json({"migrations": tasks.as_documents(tasks.list_tasks(conn))})
            else:
                print(tasks.format_table(tasks.list_tasks(conn)))
        finally:
            conn.close()
        return 0
    if args.command == "migrate":
        from anchore_objmig import migrate

        if args.json and not args.dry_run:
            raise UsageError("migrate --json prints the plan: it goes with --dry-run")

        options = migrate.MigrateOptions(
            from_config=args.from_config,
            to_config=args.to_config,
            from_analysis_archive=args.from_analysis_archive,
            to_analysis_archive=args.to_analysis_archive,
            delete_source=not args.nodelete,
            ask=not args.dontask and not args.dry_run and not args.join,
            buckets=tuple(dict.fromkeys(args.bucket)),
            all_buckets=args.all_buckets,
            allow_empty=args.allow_empty,
            workers=args.workers,
            io_threads=args.io_threads,
            batch_size=args.batch_size,
            batch_bytes=args.batch_bytes,
            shard_documents=args.shard_size,
            multipart_threshold=args.multipart_threshold,
            toast_compression=args.toast_compression,
            lease_seconds=args.lease_seconds,
            join=args.join,
            dry_run=args.dry_run,
            json=args.json,
            show_secrets=args.show_secrets,
            progress=progress_mode(args),
            metrics_file=args.metrics_file,
            log_settings=(log_level(args), args.log_format),
        )
        return migrate.run(options, db_settings(args))
    if args.command == "verify":
        from anchore_objmig import verify

        options = verify.VerifyOptions(
            config=args.config,
            analysis_archive=args.analysis_archive,
            buckets=tuple(dict.fromkeys(args.bucket)),
            workers=args.workers,
            progress=progress_mode(args),
            metrics_file=args.metrics_file,
            log_settings=(log_level(args), args.log_format),
            json=args.json,
        )
        return verify.run(options, db_settings(args))
    if args.command == "cleanup":
        from anchore_objmig import cleanup

        options = cleanup.CleanupOptions(
            config=args.from_config,
            analysis_archive=args.from_analysis_archive,
            buckets=tuple(dict.fromkeys(args.bucket)),
            ask=not args.dontask and not args.dry_run,
            dry_run=args.dry_run,
        )
        return cleanup.run(options, db_settings(args))
    raise AssertionError(args.command)


def progress_mode(args):
    """--quiet asks for warnings and errors only: no progress unless asked for by name."""
    return "none" if args.quiet and args.progress == "auto" else args.progress


def log_level(args):
    return "WARNING" if args.quiet else "DEBUG" if args.verbose else "INFO"


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(log_level(args), args.log_format)
    try:
        return dispatch(args)
    except ObjmigError as exc:
        log.error("%s", exc)
        return exc.exit_status
    except KeyboardInterrupt:
        log.error("interrupted; documents already moved stay moved, run the same command again to finish")
        return EXIT_SIGINT
    except Terminated:
        log.error("stopped by SIGTERM; documents already moved stay moved, run the same command again to finish")
        return EXIT_SIGTERM
    except Exception as exc:  # a bug, or a failure we did not foresee: one line, not a traceback
        from anchore_objmig.db import redacted

        log.error("unexpected error: %s: %s", type(exc).__name__, redacted(str(exc).strip().splitlines()[0] if str(exc).strip() else ""))
        log.debug("traceback", exc_info=True)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
