# syntax=docker/dockerfile:1
#
# kube-oidc-gate container image.
#
#   docker build -t kube-oidc-gate:0.1.0 .
#   buildah bud --isolation chroot -t kube-oidc-gate:0.1.0 .   (daemonless)
#
# Stage 1 builds the project's wheel with its hot path compiled by mypyc
# (HATCH_BUILD_HOOKS_ENABLE turns on the hook in pyproject.toml; the full
# Python image has the C compiler it needs) and fetches a wheel for every
# dependency (binary wheels only: none of them is compiled here); stage 2
# installs exactly those wheels (no index, no compiler, no pip cache) into a
# clean Python runtime of the same version and runs as an unprivileged numeric
# user, so Kubernetes' runAsNonRoot can verify it without looking up a name.

ARG PYTHON_IMAGE=python:3.11-slim
ARG BUILD_IMAGE=python:3.11

FROM ${BUILD_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HATCH_BUILD_HOOKS_ENABLE=1
WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps out tests and the rest).
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
 && python -m pip wheel --only-binary=:all: --wheel-dir /wheels /wheels/kube_oidc_gate-*.whl

FROM ${PYTHON_IMAGE}
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="kube-oidc-gate" \
      org.opencontainers.image.description="Log in to Kubernetes with your OIDC identity provider: TokenReview webhook and impersonating proxy" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The wheels are bind-mounted from the build stage, so they never become a
# layer of this image. pip compiles the bytecode at install time (the root
# filesystem is read-only at run time); then pip itself is removed.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m pip install --no-index --find-links=/wheels /wheels/kube_oidc_gate-*.whl \
 && python -m pip check \
 && python -m pip uninstall --yes pip setuptools wheel \
 && kube-oidc-gate --version | grep -F "(compiled: yes)"
USER 65532:65532
WORKDIR /tmp
# 7443 webhook, 7444 proxy (TLS); 7400 plain-HTTP probes and /metrics: the
# defaults, chosen to be free on a control-plane node (docs/configuration.md).
EXPOSE 7443 7444 7400
ENTRYPOINT ["kube-oidc-gate"]
CMD ["--help"]
