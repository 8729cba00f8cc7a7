# anchore-objmig in a container. Not built or run on the project's machines
# (they have no Docker engine); kept minimal and conventional.
#
#   docker build -t anchore-objmig .
#   docker run --rm -v /config:/config:ro anchore-objmig \
#       --db-connect postgresql://anchore@db/anchore check /config/dest-config.yaml

# Build stage: compile psycopg's C extension against libpq into wheels.
FROM python:3.11-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libpq-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY setup.cfg pyproject.toml README.md ./
COPY anchore_objmig ./anchore_objmig
COPY man ./man
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Run stage: only libpq at run time, and no root.
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends libpq5 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --create-home objmig
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels anchore-objmig && rm -rf /wheels
USER objmig
ENTRYPOINT ["anchore-objmig"]
CMD ["--help"]
