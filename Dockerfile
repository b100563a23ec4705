# syntax=docker/dockerfile:1
# pgcorral container image.
#
#   docker build -t pgcorral .
#   docker run -p 6432:6432 -v "$PWD/conf/examples:/etc/pgcorral:ro" pgcorral \
#       /etc/pgcorral/single-service.ini
#
# The image holds no configuration: mount a directory with the .ini and its auth_file at
# /etc/pgcorral (the default argument reads /etc/pgcorral/pgcorral.ini). A directory rather
# than single files, so that an edited file is seen by the container and SIGHUP picks it up.
# [pgbouncer] keys can also be overridden per container with PGCORRAL_<KEY> variables.

# Builder and runtime are the same Debian release, so the binary finds the glibc and
# OpenSSL 3 (libssl3) it was linked against.
FROM rust:1-bookworm AS build
# Already in the rust image; named so that openssl-sys's build does not rely on that.
RUN apt-get update \
 && apt-get install -y --no-install-recommends pkg-config libssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The caches keep downloaded crates and compiled dependencies between builds (the release
# profile's fat LTO makes a cold build slow). A cache mount is not part of the image, so the
# binary is copied out within the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
 && cp target/release/pgcorral /usr/local/bin/pgcorral

FROM debian:bookworm-slim
# ca-certificates: server_tls_sslmode = verify-ca/verify-full without server_tls_ca_file
# check PostgreSQL's certificate against the system roots.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin pgcorral \
 && mkdir -p /etc/pgcorral
COPY --from=build /usr/local/bin/pgcorral /usr/local/bin/pgcorral
# Nothing needs root: 6432 is not a privileged port, the Unix socket goes to /tmp (the
# default unix_socket_dir), logs go to stderr, and no pidfile is needed in the foreground.
USER pgcorral
EXPOSE 6432
# metrics_addr, when a configuration sets it (the examples use 0.0.0.0:9127).
EXPOSE 9127
# SIGINT is PgBouncer's safe shutdown: stop accepting, let running transactions finish, exit.
# Docker's default SIGTERM waits for every client to disconnect, which application pools
# never do on their own, so `docker stop` would always end in SIGKILL.
STOPSIGNAL SIGINT
# Liveness without extra tools: bash (present in every Debian image) opens a TCP connection
# to the listener and closes it; pgcorral ends such a connection silently, without a log
# line. Assumes listen_addr covers 127.0.0.1 (as "*" and 0.0.0.0 do).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${PGCORRAL_LISTEN_PORT:-6432}"]
ENTRYPOINT ["pgcorral"]
CMD ["/etc/pgcorral/pgcorral.ini"]
